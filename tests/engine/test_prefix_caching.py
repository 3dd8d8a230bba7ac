"""Automatic prefix caching: a request whose prefix was computed before reuses those KV blocks,
and its output is exactly what it would be without the cache."""

import torch

from kvflock.shared.hashing import hash_blocks
from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM
from tests.tiny_models import VOCAB

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _shared_prefix_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, VOCAB, (45,), generator=g).tolist()
    return [system + torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 10, 21)]


def test_block_hashes_depend_on_the_whole_prefix():
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, a[:1]) == a


def test_shared_prefix_is_reused_and_outputs_do_not_change(tiny_models):
    prompts = _shared_prefix_prompts()
    cached = LLM(str(tiny_models["llama"]), dtype="float64", max_model_len=128, block_size=8)
    uncached = LLM(str(tiny_models["llama"]), dtype="float64", max_model_len=128, block_size=8,
                   enable_prefix_caching=False)

    first = cached.generate(prompts[:1], GREEDY)
    rest = cached.generate(prompts[1:], GREEDY)
    scheduler = cached.engine.scheduler

    assert scheduler.prefix_hit_tokens == 2 * 40  # 5 full blocks of the 45-token prefix, twice
    reference = uncached.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in first + rest] == [o.outputs[0].token_ids for o in reference]
    assert uncached.engine.scheduler.prefix_hit_tokens == 0
    assert cached.engine.kv_manager.pool.num_free == cached.engine.kv_manager.pool.capacity


def test_a_fully_cached_prompt_still_computes_its_last_token(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float64", max_model_len=64, block_size=4)
    prompt = list(range(16))  # exactly four blocks
    [a] = llm.generate([prompt], GREEDY)
    [b] = llm.generate([prompt], GREEDY)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert llm.engine.scheduler.prefix_hit_tokens == 12  # three blocks: the fourth holds the last token
