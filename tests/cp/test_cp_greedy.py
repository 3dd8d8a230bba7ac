"""Greedy output with context parallelism equals one rank's: on the tiny random Llama and Qwen2
(float64) at CP=2, CP=4 and TP=2 x CP=2, with chunked prefill (chunks of 16 tokens, of which
those of at least 8 are split over the CP ranks), preemption (a small pool) and prefix caching
(prompts that share a prefix), also with an fp8 KV cache and at PP=2 x CP=2; and on SmolLM2
(float32) at CP=2. Ranks are processes talking over gloo, as in CI."""

from collections.abc import Callable, Iterator

import pytest
import torch

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from tests.tiny_models import VOCAB, write_tiny_models

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
# Prompts in chunks of at most 16 tokens, and a pool so small that sequences are preempted.
SCENARIO = dict(dtype="float64", max_model_len=128, block_size=4, num_kv_blocks=40, max_num_batched_tokens=16)
SPLIT_FROM = 8  # context_parallel_min_tokens: chunks of 8..16 tokens are split


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 3, 9, 16, 17, 33, 50, 71)]
    return prompts + [prompts[-1][:40] + [1, 2, 3]]  # reuses the cached prefix of the one before


@pytest.fixture(scope="module")
def cp_llm(tiny_models) -> Iterator[Callable[[str, int, int], LLM]]:
    """One replica per (architecture, TP, CP) for the whole module; all stopped at its end."""
    llms: dict[tuple[str, int, int], LLM] = {}

    def get(arch: str, tp: int, cp: int) -> LLM:
        if (arch, tp, cp) not in llms:
            llms[arch, tp, cp] = LLM(str(tiny_models[arch]), tensor_parallel_size=tp, context_parallel_size=cp,
                                     context_parallel_min_tokens=SPLIT_FROM, **SCENARIO)
        return llms[arch, tp, cp]

    yield get
    for llm in llms.values():
        llm.engine.loaded.replica.shutdown()


def token_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch,tp,cp", [("llama", 1, 2), ("llama", 1, 4), ("llama", 2, 2), ("qwen2", 1, 2),
                                        ("qwen2", 1, 4), ("qwen2", 2, 2)])
def test_greedy_output_with_context_parallelism_equals_one_rank(arch, tp, cp, cp_llm, tiny_models, prompts):
    reference = token_ids(LLM(str(tiny_models[arch]), **SCENARIO), prompts)
    llm = cp_llm(arch, tp, cp)

    assert token_ids(llm, prompts) == reference
    assert all(len(set(ids)) > 1 for ids in reference), "degenerate reference"
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.prefix_hit_tokens > 0
    assert llm.engine.kv_manager.pool.num_free == llm.engine.kv_manager.pool.capacity


def test_an_fp8_kv_cache_at_cp2_gives_one_rank_s_output(tiny_models, prompts):
    """Every rank's cache is fp8, and a split chunk is attended as the cache holds it."""
    scenario = {**SCENARIO, "dtype": "float32", "kv_cache_dtype": "fp8"}
    reference = token_ids(LLM(str(tiny_models["llama"]), **scenario), prompts)
    llm = LLM(str(tiny_models["llama"]), context_parallel_size=2, context_parallel_min_tokens=SPLIT_FROM, **scenario)
    try:
        assert token_ids(llm, prompts) == reference
        assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    finally:
        llm.engine.loaded.replica.shutdown()


@pytest.mark.parametrize("cp", [2, 4])
def test_each_rank_keeps_its_share_of_every_block(cp, cp_llm):
    engine = cp_llm("llama", 1, cp).engine

    assert engine.runner.stage.context is not None and engine.runner.stage.context.group.size == cp
    assert engine.runner.kv_cache.shape[3] == SCENARIO["block_size"] // cp


@pytest.mark.slow
def test_smollm2_at_cp2_answers_as_one_rank(smollm2):
    tok = smollm2.tokenizer
    questions = ["What is the capital of France?", "Write a haiku about the sea, please, in English."]
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    prompts = [tok.encode(c, add_special_tokens=False) for c in chats]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    limits = dict(max_model_len=256, max_num_batched_tokens=24)  # prompts of 30-40 tokens: two chunks each
    reference = token_ids(LLM.from_engine(LLMEngine(EngineConfig(model="demo", **limits), loaded=smollm2)),
                          prompts, params)

    llm = LLM("demo", device="cpu", dtype="float32", context_parallel_size=2, context_parallel_min_tokens=8, **limits)
    try:
        assert token_ids(llm, prompts, params) == reference
    finally:
        llm.engine.loaded.replica.shutdown()


def test_pipeline_stages_of_context_parallel_ranks_give_one_rank_s_output(tmp_path_factory, prompts):
    """PP=2 x CP=2: each stage's two CP ranks split the long chunks of every micro-batch."""
    model = write_tiny_models(tmp_path_factory.mktemp("deep"), num_layers=4, only=("llama",))["llama"]
    reference = token_ids(LLM(str(model), **SCENARIO), prompts)
    llm = LLM(str(model), pipeline_parallel_size=2, context_parallel_size=2, context_parallel_min_tokens=SPLIT_FROM,
              **SCENARIO)
    try:
        assert token_ids(llm, prompts) == reference
        assert llm.engine.scheduler.num_preemptions > 0
    finally:
        llm.engine.loaded.replica.shutdown()
