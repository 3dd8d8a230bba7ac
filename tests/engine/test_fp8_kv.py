"""FP8 (e4m3) KV cache: half the bytes of a bf16 cache (a quarter of float32), and answers that
stay those of the full-precision cache on the demo model."""

import pytest

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2 plus 2?"]


def test_fp8_cache_quarters_float32_kv_and_keeps_the_answers(smollm2):
    settings = dict(model="demo", max_model_len=256, num_kv_blocks=64)
    full = LLM.from_engine(LLMEngine(EngineConfig(**settings), loaded=smollm2))
    fp8 = LLM.from_engine(LLMEngine(EngineConfig(**settings, kv_cache_dtype="fp8"), loaded=smollm2))
    assert fp8.engine.runner.kv_cache.nbytes * 4 == full.engine.runner.kv_cache.nbytes

    params = SamplingParams(temperature=0.0, max_tokens=12)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    answers = fp8.chat(conversations, params)
    reference = full.chat(conversations, params)

    assert "Paris" in answers[0].outputs[0].text
    # e4m3 keeps 3 mantissa bits, so greedy paths may part after a few tokens (bench/kv_fp8.py
    # measures the agreement); the first tokens must still be the same.
    assert [a.outputs[0].token_ids[:2] for a in answers] == [r.outputs[0].token_ids[:2] for r in reference]


def test_fp8_values_beyond_the_range_saturate_instead_of_turning_nan():
    import torch

    from kvflock.kernels.paged_attention import write_kv_ref

    cache = torch.zeros(2, 1, 2, 4, 1, 2, dtype=torch.float8_e4m3fn)[:, 0]
    k = torch.full((1, 1, 2), 1000.0)
    write_kv_ref(k, -k, cache, torch.tensor([4]))
    assert cache[1, 0, 0].float().tolist() == [[448.0, 448.0]]
    assert cache[1, 1, 0].float().tolist() == [[-448.0, -448.0]]
