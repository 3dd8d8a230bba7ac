"""Greedy output with pipeline parallelism equals one rank's: on 4-layer tiny random Llama and
Qwen2 models (Qwen2's tied LM head then lives on a stage without the embedding) in float64, at
PP=2, PP=4 and TP=2 x PP=2, with chunked prefill, preemption and prefix caching; and on SmolLM2
(a GGUF file, float32) at PP=2. Ranks are processes talking over gloo, as in CI."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from tests.tiny_models import VOCAB, write_tiny_models

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Prompts in chunks of at most 16 tokens, and a pool so small that sequences are preempted.
SCENARIO = dict(dtype="float64", max_model_len=128, block_size=4, num_kv_blocks=40, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama and Qwen2 with 4 layers, enough for 4 stages."""
    return write_tiny_models(tmp_path_factory.mktemp("deep"), num_layers=4, only=("llama", "qwen2"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 3, 9, 17, 33, 50, 71)]
    return prompts + [prompts[-1][:40] + [1, 2, 3]]  # shares 10 blocks with the one before it


@pytest.fixture(scope="module")
def reference(deep_models, prompts) -> dict[str, list[list[int]]]:
    return {arch: token_ids(LLM(str(path), **SCENARIO), prompts) for arch, path in deep_models.items()}


def token_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture
def replica() -> Iterator[list[LLM]]:
    """The replicas a test starts, stopped when it ends."""
    started: list[LLM] = []
    yield started
    for llm in started:
        llm.engine.loaded.replica.shutdown()


@pytest.mark.parametrize("arch,tp,pp", [("llama", 1, 2), ("llama", 1, 4), ("qwen2", 1, 2), ("qwen2", 1, 4),
                                        ("llama", 2, 2), ("qwen2", 2, 2)])
def test_greedy_output_with_pipeline_parallelism_equals_one_rank(arch, tp, pp, deep_models, prompts, reference,
                                                                 replica):
    llm = LLM(str(deep_models[arch]), tensor_parallel_size=tp, pipeline_parallel_size=pp, **SCENARIO)
    replica.append(llm)

    assert token_ids(llm, prompts) == reference[arch]
    assert all(len(set(ids)) > 1 for ids in reference[arch]), "degenerate reference"
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.prefix_hit_tokens > 0
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.capacity


def test_the_first_stage_holds_its_layers_the_embedding_and_their_kv_only(deep_models, replica):
    llm = LLM(str(deep_models["qwen2"]), pipeline_parallel_size=4, **SCENARIO)
    replica.append(llm)
    model = llm.engine.loaded.model

    assert model.model.stage == range(0, 1)
    assert model.model.embed_tokens is not None and model.model.norm is None and model.lm_head is None
    assert llm.engine.runner.kv_cache.shape[1] == 1
    assert not any(".layers.1." in name for name, _ in model.named_parameters())


def test_more_stages_than_layers_are_refused_naming_the_field(tiny_models):
    with pytest.raises(ValueError, match="pipeline_parallel_size: 3 stages exceed the model's 2 layers"):
        LLM(str(tiny_models["llama"]), pipeline_parallel_size=3, **SCENARIO)


@pytest.mark.slow
def test_smollm2_at_pp2_answers_as_at_pp1(smollm2, replica):
    tok = smollm2.tokenizer
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    prompts = [tok.encode(c, add_special_tokens=False) for c in chats]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    settings = dict(max_model_len=256, max_num_batched_tokens=32)
    reference = token_ids(LLM.from_engine(LLMEngine(EngineConfig(model="demo", **settings), loaded=smollm2)),
                          prompts, params)

    llm = LLM("demo", device="cpu", dtype="float32", pipeline_parallel_size=2, **settings)
    replica.append(llm)

    assert token_ids(llm, prompts, params) == reference
    assert llm.engine.runner.kv_cache.shape[1] == 15  # 30 layers over 2 stages
