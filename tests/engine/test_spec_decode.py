"""Speculative decoding: greedy outputs identical to plain decoding with both drafters, sampling
that keeps the target distribution (chi-square on a tiny vocabulary), KV blocks and prefix
cache accounted, bad settings refused by field, acceptance in /metrics."""

import random
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

from kvflock.shared.hashing import hash_blocks
from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.attention import TorchAttentionBackend
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine, RequestOutput
from kvflock.worker.llm import LLM
from kvflock.worker.model.loader import LoadedModel, load
from kvflock.worker.server import WorkerState, create_app
from kvflock.worker.spec_decode.drafters import NgramIndex
from kvflock.worker.spec_decode.verify import accept_greedy, accept_sampled
from tests.engine.random_workload import run_random_workload
from tests.server.conftest import free_port, metric, running_server
from tests.tiny_models import VOCAB

SMALL_VOCAB = 4


def _load(path: Path, dtype: str = "float64") -> LoadedModel:
    return load(EngineConfig(model=str(path), dtype=dtype, device="cpu"), TorchAttentionBackend())


@pytest.fixture(scope="module")
def llama64(tiny_models) -> LoadedModel:
    return _load(tiny_models["llama"])


@pytest.fixture(scope="module")
def mistral64(tiny_models) -> LoadedModel:
    """Another random model with the same vocabulary: a draft model that is mostly wrong."""
    return _load(tiny_models["mistral"])


def _engine(target: LoadedModel, draft: LoadedModel | None = None, **settings) -> LLMEngine:
    if draft is not None:
        settings = {"speculative_method": "draft", "draft_model": str(draft.source.path), **settings}
    return LLMEngine(EngineConfig(model=str(target.source.path), **settings), loaded=target, draft=draft)


def _chi_square_p_value(observed: list[int], expected: list[float]) -> float:
    """Pearson's test, cells expected below 5 pooled into one."""
    small = [i for i, e in enumerate(expected) if e < 5]
    cells = [(observed[i], expected[i]) for i in range(len(expected)) if expected[i] >= 5]
    if small:
        cells.append((sum(observed[i] for i in small), sum(expected[i] for i in small)))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


# -- the pure parts --------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_match_of_the_longest_suffix():
    index = NgramIndex(min_n=1, max_n=3)
    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3]
    assert index.continuation(tokens, 3) == [4, 5, 7]  # [2, 3] last seen before 4
    assert index.continuation(tokens + [4], 2) == [5, 7]  # [2, 3, 4] beats the shorter suffixes
    assert NgramIndex(min_n=2, max_n=3).continuation([1, 2, 3, 4], 3) == []


def test_greedy_acceptance_keeps_drafts_up_to_the_first_mismatch():
    assert accept_greedy([5, 6, 7], [5, 6, 8, 9]) == [5, 6, 8]
    assert accept_greedy([5, 6, 7], [5, 6, 7, 9]) == [5, 6, 7, 9]
    assert accept_greedy([5], [4, 9]) == [4]


@pytest.mark.parametrize("drafter", ["point-mass", "distribution"])
def test_rejection_sampling_emits_tokens_with_the_target_distribution(drafter):
    gen = torch.Generator().manual_seed(0)
    vocab, draws = 6, 6000
    p = torch.rand(3, vocab, generator=gen, dtype=torch.float64).pow(2)
    p /= p.sum(-1, keepdim=True)
    q = torch.rand(2, vocab, generator=gen, dtype=torch.float64)
    q /= q.sum(-1, keepdim=True)
    first, second = [0] * vocab, [0] * vocab
    for _ in range(draws):
        draft = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        tokens = accept_sampled(draft, p, q if drafter == "distribution" else None, gen)
        first[tokens[0]] += 1
        if tokens[0] == draft[0]:  # p[1] is the target's distribution after draft[0]
            second[tokens[1]] += 1

    assert _chi_square_p_value(first, (p[0] * draws).tolist()) > 1e-3
    assert _chi_square_p_value(second, (p[1] * sum(second)).tolist()) > 1e-3
    assert sum(second) < draws, "some first drafts must have been rejected"


# -- greedy: identical to plain decoding -------------------------------------------------


def _repetitive_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for length in (5, 11, 23):
        text = [rng.randrange(VOCAB) for _ in range(length)]
        prompts.append(text + text[: length // 2] + text)
    return prompts


def _greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in LLM.from_engine(engine).generate(prompts, params)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("drafter", ["ngram", "draft-self", "draft-other"])
def test_greedy_output_is_identical_with_speculative_decoding(drafter, llama64, mistral64):
    # Small blocks and budget: drafts cross block boundaries and get cut to what fits.
    limits = dict(block_size=4, max_model_len=160, max_num_batched_tokens=40, num_kv_blocks=80)
    prompts = _repetitive_prompts(0)
    plain = _greedy(_engine(llama64, **limits), prompts)
    if drafter == "ngram":
        engine = _engine(llama64, speculative_method="ngram", prompt_lookup_min=1, num_speculative_tokens=3, **limits)
    else:
        engine = _engine(llama64, llama64 if drafter == "draft-self" else mistral64, num_speculative_tokens=3, **limits)

    assert _greedy(engine, prompts) == plain
    stats = engine.speculator.stats
    assert stats.num_drafted_tokens > 0
    if drafter == "draft-self":
        assert stats.acceptance_rate > 0.9 and stats.tokens_per_step > 3
    if drafter == "draft-other":
        assert stats.acceptance_rate < 0.5, "the rejection path must be exercised"
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.capacity


def test_a_stop_inside_accepted_drafts_ends_the_output_there(llama64):
    prompts = _repetitive_prompts(4)[:1]
    plain = _greedy(_engine(llama64, max_model_len=160), prompts)[0]
    stop = plain[6]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop])
    engine = _engine(llama64, llama64, num_speculative_tokens=4, max_model_len=160)
    [out] = LLM.from_engine(engine).generate(prompts, params)

    assert out.outputs[0].token_ids == plain[:plain.index(stop) + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.capacity


@pytest.fixture(scope="module")
def smollm2_chats(smollm2) -> list[list[int]]:
    text = ("Ships carried spices from the eastern ports to the western markets, where merchants sold "
            "them at twice the price they had paid.")
    questions = [f"Repeat this sentence exactly, then stop:\n{text}", "List the days of the week, one per line."]
    llm = LLM.from_engine(LLMEngine(EngineConfig(model="demo", max_model_len=512), loaded=smollm2))
    return [llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]


SMOLLM2_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2_plain(smollm2, smollm2_chats) -> list[list[int]]:
    return _greedy(LLMEngine(EngineConfig(model="demo", max_model_len=512), loaded=smollm2), smollm2_chats,
                   SMOLLM2_TOKENS)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_smollm2_greedy_output_is_identical_with_speculative_decoding(method, smollm2, smollm2_chats, smollm2_plain):
    settings = {"speculative_method": method, "num_speculative_tokens": 4}
    if method == "draft":  # the model itself as its own draft model: the drafter's mechanics, at full acceptance
        settings["draft_model"] = "demo"
    engine = LLMEngine(EngineConfig(model="demo", max_model_len=512, **settings), loaded=smollm2,
                       draft=smollm2 if method == "draft" else None)

    assert _greedy(engine, smollm2_chats, SMOLLM2_TOKENS) == smollm2_plain
    assert engine.speculator.stats.acceptance_rate > 0.3, "a repeated sentence is drafted well"


# -- sampling keeps the target distribution ------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab_models(tmp_path_factory) -> dict[str, Path]:
    """Two random Llamas over a vocabulary of 4 tokens: target and draft model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("small-vocab")
    paths = {}
    for seed, name in enumerate(["target", "draft"]):
        config = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             eos_token_id=None, bos_token_id=None, pad_token_id=None)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
        model.generation_config.eos_token_id = None
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _exact_distribution(path: Path, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    """P(next `length` tokens) of the model at temperature 1, by enumeration (transformers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        prefixes = list(probs)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        nxt = logits.softmax(-1)
        probs = {p + (t,): probs[p] * float(nxt[i, t]) for i, p in enumerate(prefixes) for t in range(SMALL_VOCAB)}
    return probs


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_tokens_keep_the_target_distribution(method, small_vocab_models):
    prompt, length, samples = [0, 1, 2, 3, 0, 1], 3, 2000
    target = _load(small_vocab_models["target"])
    settings = dict(max_model_len=64, max_num_seqs=256, num_speculative_tokens=2, seed=1)
    if method == "ngram":
        engine = _engine(target, speculative_method="ngram", prompt_lookup_min=1, prompt_lookup_max=2, **settings)
    else:
        engine = _engine(target, _load(small_vocab_models["draft"]), **settings)
    params = SamplingParams(temperature=1.0, max_tokens=length, ignore_eos=True)
    outputs = LLM.from_engine(engine).generate([prompt] * samples, params)

    exact = _exact_distribution(small_vocab_models["target"], prompt, length)
    cells = sorted(exact)
    counts = {cell: 0 for cell in cells}
    for out in outputs:
        counts[tuple(out.outputs[0].token_ids)] += 1
    stats = engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_drafted_tokens, "both acceptance and rejection must occur"
    assert _chi_square_p_value([counts[c] for c in cells], [exact[c] * samples for c in cells]) > 1e-3


def test_seeded_requests_reproduce_with_speculative_decoding(llama64):
    engine = _engine(llama64, speculative_method="ngram", prompt_lookup_min=1, max_model_len=160)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=16, seed=42, ignore_eos=True)
    llm = LLM.from_engine(engine)
    prompts = _repetitive_prompts(1)[:2]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == first
    assert engine.speculator.stats.num_drafted_tokens > 0


# -- KV blocks -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("drafter", ["ngram", "draft-self"])
def test_blocks_return_and_only_accepted_tokens_reach_the_prefix_cache(drafter, llama64):
    rng = random.Random(3)
    limits = dict(max_model_len=96, block_size=4, num_kv_blocks=30, max_num_batched_tokens=24, num_speculative_tokens=3)
    if drafter == "ngram":
        engine = _engine(llama64, speculative_method="ngram", prompt_lookup_min=1, **limits)
    else:
        engine = _engine(llama64, llama64, **limits)
    sequences: dict[tuple[str, int], list[int]] = {}

    def new_request(rng: random.Random) -> tuple[list[int], SamplingParams]:
        text = [rng.randrange(VOCAB) for _ in range(rng.randint(4, 20))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 30),
                                n=rng.choice([1, 1, 2]), ignore_eos=True)
        return text + text, params

    def record(out: RequestOutput) -> None:
        for c in out.outputs:
            sequences[(out.request_id, c.index)] = out.prompt_token_ids + c.token_ids

    run_random_workload(engine, rng, new_request, arrivals_until=30, arrival_rate=0.5, abort_rate=0.05,
                        max_steps=300, on_output=record)

    assert not engine.has_unfinished_requests()
    stats = engine.speculator.stats
    assert engine.scheduler.num_preemptions > 0 and stats.num_drafted_tokens > 0
    if drafter == "draft-self":  # a random model copies no prompt, but agrees with itself
        assert stats.num_accepted_tokens > 0
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.capacity
    real_prefixes = {h for tokens in sequences.values() for h in hash_blocks(tokens, 4)}
    assert set(engine.kv_manager.pool._block_of) <= real_prefixes, "a block holding rejected drafts was cached"


# -- settings and metrics ----------------------------------------------------------------


@pytest.mark.parametrize(("settings", "field"), [
    ({"speculative_method": "draft"}, "draft_model"),
    ({"draft_model": "/models/small"}, "draft_model"),
    ({"speculative_method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_min"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
])
def test_bad_speculative_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="demo", **settings)


def test_a_draft_model_with_another_vocabulary_is_refused(llama64, small_vocab_models):
    with pytest.raises(ValueError, match="draft_model: its vocabulary of 4 tokens differs"):
        _engine(llama64, _load(small_vocab_models["draft"]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_acceptance_rate_and_tokens_per_step_are_in_metrics(smollm2, smollm2_chats):
    engine = LLMEngine(EngineConfig(model="demo", max_model_len=512, speculative_method="ngram"), loaded=smollm2)
    state = WorkerState(served_model_name="smollm2")
    state.set_engine(AsyncEngine(engine))
    with running_server(create_app(state), free_port()) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", http_client=httpx.Client(timeout=60))
        api.completions.create(model="smollm2", prompt=smollm2_chats[0], max_tokens=16, temperature=0)
        assert metric(url, "kvflock_spec_decode_draft_tokens_total") > 0
        assert 0 < metric(url, "kvflock_spec_decode_accepted_tokens_total") <= metric(
            url, "kvflock_spec_decode_draft_tokens_total")
        assert 0 < metric(url, "kvflock_spec_decode_acceptance_rate") <= 1
        assert metric(url, "kvflock_spec_decode_tokens_per_step") > 1
        state.engine.shutdown()


@pytest.mark.timeout(240)
def test_greedy_output_is_identical_with_speculative_decoding_under_tensor_parallelism(llama64, tiny_models):
    limits = dict(block_size=4, max_model_len=160, max_num_batched_tokens=40, num_kv_blocks=80, dtype="float64")
    prompts = _repetitive_prompts(2)
    plain = _greedy(_engine(llama64, **{k: v for k, v in limits.items() if k != "dtype"}), prompts)
    # Rank 0 runs the draft model by itself (loaded here from its path); the ranks verify together.
    llm = LLM(str(tiny_models["llama"]), tensor_parallel_size=2, speculative_method="draft",
              draft_model=str(tiny_models["llama"]), num_speculative_tokens=3, **limits)
    try:
        assert _greedy(llm.engine, prompts) == plain
        assert llm.engine.speculator.stats.acceptance_rate > 0.9
        assert llm.engine.kv_manager.pool.num_free == llm.engine.kv_manager.pool.capacity
    finally:
        llm.engine.loaded.replica.shutdown()


def test_cli_refuses_a_draft_method_without_a_draft_model():
    result = subprocess.run([sys.executable, "-m", "kvflock.cli", "generate", "--prompt", "hi",
                             "--speculative-method", "draft"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "draft_model" in result.stderr and "Traceback" not in result.stderr
