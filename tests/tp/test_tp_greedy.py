"""Greedy output with tensor parallelism equals one rank's: on the tiny random Llama (8 query,
2 KV heads: TP=4 replicates KV heads) and Qwen2 (8 query, 4 KV heads, qkv bias, tied
embeddings) in float64, with chunked prefill and preemption; and on SmolLM2 (9 query, 3 KV
heads, a GGUF file) at TP=3. Ranks are processes talking over gloo, as in CI."""

from collections.abc import Callable, Iterator

import pytest
import torch

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from tests.tiny_models import VOCAB

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
# Prompts in chunks of at most 16 tokens, and a pool so small that sequences are preempted.
SCENARIO = dict(dtype="float64", max_model_len=128, block_size=4, num_kv_blocks=40, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 3, 9, 16, 17, 33, 50, 71)]


@pytest.fixture(scope="module")
def tp_llm(tiny_models) -> Iterator[Callable[[str, int], LLM]]:
    """One replica per (architecture, TP size) for the whole module; all stopped at its end."""
    llms: dict[tuple[str, int], LLM] = {}

    def get(arch: str, tp: int) -> LLM:
        if (arch, tp) not in llms:
            llms[arch, tp] = LLM(str(tiny_models[arch]), tensor_parallel_size=tp, **SCENARIO)
        return llms[arch, tp]

    yield get
    for llm in llms.values():
        llm.engine.loaded.replica.shutdown()


def token_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("llama", 4), ("qwen2", 2), ("qwen2", 4)])
def test_greedy_output_with_tensor_parallelism_equals_one_rank(arch, tp, tp_llm, tiny_models, prompts):
    reference = token_ids(LLM(str(tiny_models[arch]), **SCENARIO), prompts)
    llm = tp_llm(arch, tp)

    assert token_ids(llm, prompts) == reference
    assert all(len(set(ids)) > 1 for ids in reference), "degenerate reference"
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_manager.pool.num_free == llm.engine.kv_manager.pool.capacity


@pytest.mark.parametrize("arch,tp,kv_heads", [("llama", 2, 1), ("llama", 4, 1), ("qwen2", 2, 2), ("qwen2", 4, 1)])
def test_each_rank_keeps_only_the_kv_heads_of_its_query_heads(arch, tp, kv_heads, tp_llm):
    engine = tp_llm(arch, tp).engine
    attention = engine.loaded.model.model.layers[0].self_attn

    assert engine.runner.kv_cache.shape[4] == kv_heads == attention.num_kv_heads
    assert attention.num_heads == 8 // tp


@pytest.mark.slow
def test_smollm2_at_tp3_answers_as_at_tp1(smollm2):
    tok = smollm2.tokenizer
    questions = ["What is the capital of France?", "Hi", "Write a haiku about the sea.", "List three prime numbers."]
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    prompts = [tok.encode(c, add_special_tokens=False) for c in chats]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    reference = token_ids(LLM.from_engine(LLMEngine(EngineConfig(model="demo", max_model_len=512), loaded=smollm2)),
                          prompts, params)

    llm = LLM("demo", device="cpu", dtype="float32", max_model_len=512, tensor_parallel_size=3)
    try:
        assert token_ids(llm, prompts, params) == reference
        assert llm.engine.runner.kv_cache.shape[4] == 1  # 3 KV heads over 3 ranks
    finally:
        llm.engine.loaded.replica.shutdown()
