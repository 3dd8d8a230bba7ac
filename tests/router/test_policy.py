"""The router's decisions, without I/O: prefix affinity, bounded load, pools, and the replicas
it must skip."""

from collections import Counter

import pytest

from kvflock.router.policy import (
    REASON_CONSISTENT_HASH,
    REASON_LEAST_LOADED,
    REASON_PREFIX_HIT,
    REASON_PREFIX_OVERLOADED,
    REASON_ROUND_ROBIN,
    Pool,
    Refusal,
    ReplicaView,
    RequestFeatures,
    Route,
    Router,
)
from kvflock.router.prefix_index import PrefixIndex
from kvflock.router.prompt import PromptReader, chained_block_hashes


def replicas(*ids: str, **overrides) -> list[ReplicaView]:
    return [ReplicaView(id=i, pool="default", ready=True, **overrides) for i in ids]


def features(prefix: int, suffix: int = 0, blocks: int = 8) -> RequestFeatures:
    """A prompt of `blocks` blocks whose first blocks are shared by every prompt of `prefix`."""
    tokens = [prefix] * 16 * (blocks - 1) + [1000 + suffix] * 16
    return RequestFeatures(prompt_tokens=len(tokens), block_hashes=chained_block_hashes(tokens, 16))


def route(router: Router, request: RequestFeatures, fleet: list[ReplicaView], **kw) -> Route:
    choice = router.choose(request, fleet, **kw)
    assert isinstance(choice, Route), choice
    return choice


def test_requests_sharing_a_prefix_go_to_the_same_replica():
    router = Router("prefix-aware")
    fleet = replicas("a", "b", "c")
    first = route(router, features(prefix=1, suffix=0), fleet)
    assert first.reason == REASON_CONSISTENT_HASH
    for suffix in range(1, 10):
        again = route(router, features(prefix=1, suffix=suffix), fleet)
        assert (again.replica, again.reason) == (first.replica, REASON_PREFIX_HIT)
        assert again.matched_blocks == 7  # all but the last, distinct block


def test_distinct_prefixes_spread_over_the_replicas():
    router = Router("prefix-aware")
    fleet = replicas("a", "b", "c")
    chosen = Counter(route(router, features(prefix=p), fleet).replica for p in range(60))
    assert set(chosen) == {"a", "b", "c"}
    assert min(chosen.values()) >= 8


def test_a_hot_prefix_spills_to_a_second_replica_when_its_holder_is_over_the_load_bound():
    router = Router("prefix-aware", load_factor=1.25, load_slack=0)
    holder = route(router, features(prefix=1), replicas("a", "b", "c")).replica
    busy = [ReplicaView(id=i, pool="default", ready=True, in_flight=6 if i == holder else 1) for i in "abc"]
    spilled = route(router, features(prefix=1, suffix=1), busy)
    assert spilled.replica != holder
    assert spilled.reason == REASON_PREFIX_OVERLOADED
    # The spill follows the ring, so the hot prefix keeps landing on the same second replica.
    assert route(router, features(prefix=1, suffix=2), busy).replica == spilled.replica


def test_a_small_burst_of_one_prefix_stays_together_within_the_slack():
    router = Router("prefix-aware", load_factor=1.25, load_slack=4)
    holder = route(router, features(prefix=1), replicas("a", "b", "c")).replica
    busy = [ReplicaView(id=i, pool="default", ready=True, in_flight=4 if i == holder else 0) for i in "abc"]
    assert route(router, features(prefix=1, suffix=1), busy).replica == holder


def test_the_load_bound_counts_other_routers_requests_too():
    router = Router("prefix-aware", load_slack=0)
    holder = route(router, features(prefix=1), replicas("a", "b")).replica
    other = "b" if holder == "a" else "a"
    fleet = [ReplicaView(id=holder, pool="default", ready=True, foreign=12),
             ReplicaView(id=other, pool="default", ready=True)]
    assert route(router, features(prefix=1, suffix=1), fleet).replica == other


def test_prompts_shorter_than_a_block_go_to_the_least_loaded_replica():
    router = Router("prefix-aware")
    fleet = [ReplicaView(id="a", pool="default", ready=True, foreign=3),
             ReplicaView(id="b", pool="default", ready=True, foreign=1, queued_tokens=50),
             ReplicaView(id="c", pool="default", ready=True, foreign=1)]
    choice = route(router, RequestFeatures(prompt_tokens=5), fleet)
    assert (choice.replica, choice.reason) == ("c", REASON_LEAST_LOADED)


def test_least_loaded_ignores_prefixes():
    router = Router("least-loaded")
    fleet = [ReplicaView(id="a", pool="default", ready=True, in_flight=2),
             ReplicaView(id="b", pool="default", ready=True, in_flight=1)]
    assert route(router, features(prefix=1), fleet).replica == "b"


def test_round_robin_takes_turns():
    router = Router("round-robin")
    fleet = replicas("a", "b", "c")
    picks = [route(router, features(prefix=1), fleet) for _ in range(6)]
    assert [p.replica for p in picks] == ["a", "b", "c", "a", "b", "c"]
    assert {p.reason for p in picks} == {REASON_ROUND_ROBIN}
    # It still reports what each replica was believed to hold, for the hit-rate estimate.
    assert [p.matched_blocks for p in picks] == [0, 0, 0, 8, 8, 8]


@pytest.mark.parametrize("policy", ["prefix-aware", "least-loaded", "round-robin"])
def test_draining_unready_and_saturated_replicas_are_skipped(policy):
    router = Router(policy)
    fleet = [ReplicaView(id="a", pool="default", ready=True, draining=True),
             ReplicaView(id="b", pool="default", ready=False),
             ReplicaView(id="c", pool="default", ready=True, saturated=True),
             ReplicaView(id="d", pool="default", ready=True)]
    assert {route(router, features(prefix=p), fleet).replica for p in range(20)} == {"d"}


def test_replicas_already_tried_are_skipped():
    router = Router("prefix-aware")
    fleet = replicas("a", "b")
    first = route(router, features(prefix=1), fleet)
    retry = route(router, features(prefix=1), fleet, exclude=frozenset({first.replica}))
    assert retry.replica != first.replica


def test_no_ready_replica_is_a_503():
    router = Router("prefix-aware")
    fleet = [ReplicaView(id="a", pool="default", ready=False), ReplicaView(id="b", pool="default", ready=True, draining=True)]
    choice = router.choose(features(prefix=1), fleet)
    assert isinstance(choice, Refusal) and choice.status == 503


def test_every_queue_full_is_a_429():
    router = Router("prefix-aware")
    choice = router.choose(features(prefix=1), replicas("a", "b", saturated=True))
    assert isinstance(choice, Refusal) and choice.status == 429


def test_prompts_go_to_the_pool_their_length_falls_in():
    pools = [Pool("short", 0, 64), Pool("long", 64, None)]
    router = Router("prefix-aware", pools)
    fleet = [ReplicaView(id="s1", pool="short", ready=True), ReplicaView(id="s2", pool="short", ready=True),
             ReplicaView(id="l1", pool="long", ready=True)]
    short = route(router, features(prefix=1, blocks=2), fleet)  # 32 tokens
    long = route(router, features(prefix=2, blocks=8), fleet)  # 128 tokens
    assert short.pool == "short" and short.replica in {"s1", "s2"}
    assert (long.pool, long.replica) == ("long", "l1")


def test_a_pool_with_replicas_none_ready_refuses_rather_than_overflowing():
    router = Router("prefix-aware", [Pool("short", 0, 64), Pool("long", 64)])
    fleet = [ReplicaView(id="s1", pool="short", ready=True), ReplicaView(id="l1", pool="long", ready=False)]
    choice = router.choose(features(prefix=2, blocks=8), fleet)
    assert isinstance(choice, Refusal) and choice.status == 503 and choice.pool == "long"


def test_a_pool_without_replicas_falls_back_to_the_whole_fleet():
    router = Router("prefix-aware", [Pool("short", 0, 64), Pool("long", 64)])
    fleet = replicas("a", "b")  # every pod carries the operator's default pool label
    choice = route(router, features(prefix=2, blocks=8), fleet)
    assert choice.pool is None and choice.replica in {"a", "b"}


def test_the_ring_moves_only_the_removed_replicas_prefixes():
    fleet = replicas("a", "b", "c", "d")
    before = {p: route(Router("prefix-aware"), features(prefix=p), fleet).replica for p in range(80)}
    smaller = [r for r in fleet if r.id != "d"]
    after = {p: route(Router("prefix-aware"), features(prefix=p), smaller).replica for p in range(80)}
    assert all(after[p] == before[p] for p in before if before[p] != "d")


def test_the_index_forgets_a_prompts_tail_before_its_head():
    index = PrefixIndex()
    hashes = chained_block_hashes(list(range(64)), 16)
    index.record("a", hashes)
    index.set_capacity("a", 2)
    assert index.matched_blocks(hashes, ["a"]) == {"a": 2}


def test_token_prompts_and_text_prompts_hash_alike_with_a_tokenizer():
    class Tokenizer:
        chat_template = None

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text]

    reader = PromptReader(block_size=4, tokenizer=Tokenizer())
    text = reader.features("/v1/completions", {"prompt": "abcdefghi"})
    ids = reader.features("/v1/completions", {"prompt": [ord(c) for c in "abcdefghi"]})
    assert text == ids and len(text.block_hashes) == 2 and text.prompt_tokens == 9


def test_chat_prompts_sharing_a_system_message_share_leading_hashes_without_a_tokenizer():
    reader = PromptReader(block_size=4)
    system = {"role": "system", "content": "You are a careful assistant. " * 10}
    one = reader.features("/v1/chat/completions", {"messages": [system, {"role": "user", "content": "hi"}]})
    two = reader.features("/v1/chat/completions", {"messages": [system, {"role": "user", "content": "bye"}]})
    shared = sum(1 for x, y in zip(one.block_hashes, two.block_hashes) if x == y)
    assert shared >= 15 and one.prompt_tokens > 70


def _adapter_request(adapter: str | None, prefix: int = 1, suffix: int = 0) -> RequestFeatures:
    tokens = [prefix] * 16 * 7 + [1000 + suffix] * 16
    return PromptReader(16).features("/v1/completions", {"prompt": tokens}, adapter)


@pytest.mark.parametrize("policy", ["prefix-aware", "least-loaded", "round-robin"])
def test_an_adapters_requests_go_only_to_replicas_that_serve_it(policy):
    router = Router(policy)
    fleet = [ReplicaView(id="a", pool="default", ready=True),
             ReplicaView(id="b", pool="default", ready=True, adapters=frozenset({"sql"})),
             ReplicaView(id="c", pool="default", ready=True, adapters=frozenset({"sql", "poetry"}))]
    assert {route(router, _adapter_request("sql", suffix=s), fleet).replica for s in range(20)} <= {"b", "c"}
    assert {route(router, _adapter_request("poetry", suffix=s), fleet).replica for s in range(5)} == {"c"}


def test_an_adapters_prefix_sticks_to_one_of_its_replicas():
    router = Router("prefix-aware")
    fleet = replicas("a", "b", "c", adapters=frozenset({"sql"}))
    first = route(router, _adapter_request("sql"), fleet)
    again = route(router, _adapter_request("sql", suffix=1), fleet)
    assert (again.replica, again.reason) == (first.replica, REASON_PREFIX_HIT)


def test_the_base_models_prefix_is_not_taken_for_an_adapters():
    """The workers cache an adapter's KV apart from the base model's: so does the router's index."""
    router = Router("prefix-aware")
    fleet = replicas("a", "b", "c", adapters=frozenset({"sql"}))
    route(router, _adapter_request(None), fleet)
    assert route(router, _adapter_request("sql"), fleet).matched_blocks == 0
    assert _adapter_request("sql").block_hashes[0] != _adapter_request("poetry").block_hashes[0]
    assert _adapter_request("sql").block_hashes[0] != _adapter_request(None).block_hashes[0]


def test_an_adapter_goes_outside_its_pool_when_no_replica_there_serves_it():
    router = Router("least-loaded", pools=[Pool("short", 0, 1000), Pool("long", 1000)])
    fleet = [ReplicaView(id="s", pool="short", ready=True),
             ReplicaView(id="l", pool="long", ready=True, adapters=frozenset({"sql"}))]
    assert route(router, _adapter_request("sql"), fleet).replica == "l"


def test_an_adapter_whose_replicas_are_all_unready_is_refused_naming_it():
    router = Router("prefix-aware")
    fleet = [ReplicaView(id="a", pool="default", ready=True),
             ReplicaView(id="b", pool="default", ready=False, adapters=frozenset({"sql"}))]
    refusal = router.choose(_adapter_request("sql"), fleet)
    assert isinstance(refusal, Refusal) and refusal.status == 503
    assert "'sql'" in refusal.message
