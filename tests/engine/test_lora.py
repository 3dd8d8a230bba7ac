"""LoRA adapters in the engine: greedy output with an adapter is transformers' with the adapter
merged into the weights (tiny random Llama and Qwen2 in float64, SmolLM2 in float32); a batch
mixing adapters and the base model gives each request what it gets alone, also when the
adapters outnumber the device slots; KV blocks are never shared across adapters; bad adapter
folders are refused naming lora_path."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from tests.lora_adapters import merged, write_adapter
from tests.tiny_models import VOCAB, hf_greedy

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def run(engine: LLMEngine, requests: list[tuple[list[int] | str, str | None]], params=GREEDY) -> list[list[int]]:
    """Greedy outputs of (prompt, adapter) requests, all added before the first step."""
    ids = [f"r{i}-{id(requests)}" for i in range(len(requests))]
    for request_id, (prompt, lora) in zip(ids, requests):
        engine.add_request(request_id, prompt, params, lora_name=lora)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 17, 40)]


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return {arch: AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float64).eval()
            for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, hf_models):
    """Per architecture: all seven projections at rank 8; q/v only at rank 16 with rsLoRA
    scaling; and two more of rank 4 for the mixed batch."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch, model in hf_models.items():
        out[arch] = {
            "all8": write_adapter(root / arch / "all8", model, 8, 16, seed=1),
            "qv16": write_adapter(root / arch / "qv16", model, 16, 8, ("q_proj", "v_proj"), seed=2, rslora=True),
            "mlp4": write_adapter(root / arch / "mlp4", model, 4, 8, ("gate_proj", "up_proj", "down_proj"), seed=3),
            "kvo4": write_adapter(root / arch / "kvo4", model, 4, 4, ("k_proj", "v_proj", "o_proj"), seed=4),
        }
    return out


def lora_engine(model_path, adapters: dict, **overrides) -> LLMEngine:
    settings = dict(model=str(model_path), dtype="float64", device="cpu", max_model_len=128, enable_lora=True,
                    max_loras=4, max_lora_rank=16, enable_prefix_caching=True)
    engine = LLMEngine(EngineConfig(**{**settings, **overrides}))
    for name, path in adapters.items():
        engine.load_lora(name, str(path))
    return engine


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_with_adapter_matches_transformers_merged(arch, tiny_models, hf_models, adapters, prompts):
    engine = lora_engine(tiny_models[arch], adapters[arch])
    for name in ("all8", "qv16"):
        want = hf_greedy(merged(hf_models[arch], adapters[arch][name]), prompts, MAX_NEW)
        assert run(engine, [(p, name) for p in prompts]) == want, name
    assert run(engine, [(p, None) for p in prompts]) == hf_greedy(hf_models[arch], prompts, MAX_NEW)


@pytest.mark.parametrize("max_loras", [4, 2], ids=["slots_for_all", "fewer_slots_than_adapters"])
def test_batch_mixing_four_adapters_and_base_matches_each_alone(max_loras, tiny_models, hf_models, adapters, prompts):
    names = [None, "all8", "qv16", "mlp4", "kvo4"]
    want = {name: hf_greedy(merged(hf_models["llama"], adapters["llama"][name]) if name else hf_models["llama"],
                            prompts[1:3], MAX_NEW) for name in names}
    engine = lora_engine(tiny_models["llama"], adapters["llama"], max_loras=max_loras)
    requests = [(p, name) for p in prompts[1:3] for name in names]
    got = run(engine, requests)
    for (prompt, name), tokens in zip(requests, got):
        assert tokens == want[name][prompts[1:3].index(prompt)], name
    stats = engine.stats().lora
    assert stats.loaded <= max_loras and stats.swaps >= 4
    assert stats.requests == {"all8": 2, "qv16": 2, "mlp4": 2, "kvo4": 2}


def test_prefix_cache_is_not_shared_across_adapters(tiny_models, adapters, prompts):
    engine = lora_engine(tiny_models["llama"], adapters["llama"], block_size=4)
    prompt = prompts[3]
    first = run(engine, [(prompt, "all8")])
    hits = engine.scheduler.prefix_hit_tokens
    other = run(engine, [(prompt, "qv16")])
    assert engine.scheduler.prefix_hit_tokens == hits, "another adapter reused the KV of all8"
    base = run(engine, [(prompt, None)])
    assert engine.scheduler.prefix_hit_tokens == hits, "the base model reused an adapter's KV"
    assert run(engine, [(prompt, "all8")]) == first
    assert engine.scheduler.prefix_hit_tokens > hits, "the same adapter should find its own prefix"
    assert first != other and first != base


def test_adapter_limit_and_unknown_names_are_refused(tiny_models, adapters, tmp_path, hf_models):
    engine = lora_engine(tiny_models["llama"], {}, max_lora_rank=8)
    with pytest.raises(ValueError, match="lora_path: the adapter's rank 16 exceeds max_lora_rank=8"):
        engine.load_lora("big", str(adapters["llama"]["qv16"]))
    with pytest.raises(ValueError, match="lora_path: .* is not a PEFT adapter folder"):
        engine.load_lora("none", str(tmp_path))
    bad = write_adapter(tmp_path / "bad", hf_models["llama"], 4, 4, ("q_proj",))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lora_path: tensor 'base_model.model.lm_head.lora_A.weight'"):
        engine.load_lora("bad", str(bad))
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(ValueError, match="lora_path: DoRA"):
        engine.load_lora("bad", str(bad))
    with pytest.raises(ValueError, match="model: no adapter 'nope' is loaded"):
        engine.add_request("x", [1, 2], GREEDY, lora_name="nope")
    with pytest.raises(ValueError, match="lora_name: no adapter 'nope' is loaded"):
        engine.unload_lora("nope")


def test_unload_refuses_an_adapter_in_use(tiny_models, adapters):
    engine = lora_engine(tiny_models["llama"], {"all8": adapters["llama"]["all8"]})
    engine.add_request("busy", [1, 2, 3], GREEDY, lora_name="all8")
    with pytest.raises(ValueError, match="in use by 1 request"):
        engine.unload_lora("all8")
    while engine.has_unfinished_requests():
        engine.step()
    engine.unload_lora("all8")
    assert engine.loras.names == []


def test_lora_with_tensor_parallelism_is_refused_at_start():
    with pytest.raises(ValueError, match="enable_lora: LoRA adapters are served with tensor_parallel_size=1 only"):
        EngineConfig(enable_lora=True, tensor_parallel_size=2)


def test_smollm2_greedy_with_random_adapter_matches_transformers_merged(smollm2, smollm2_hf, tmp_path):
    folder = write_adapter(tmp_path / "smol", smollm2_hf, 16, 32, seed=5, std=0.5)
    engine = LLMEngine(EngineConfig(model="demo", device="cpu", dtype="float32", enable_lora=True, max_lora_rank=16,
                                    max_model_len=256), loaded=smollm2)
    engine.load_lora("smol", str(folder))
    prompts = [engine.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):")]
    want = hf_greedy(merged(smollm2_hf, folder), prompts, MAX_NEW)
    assert want != hf_greedy(smollm2_hf, prompts, MAX_NEW), "the adapter should change the output"
    assert run(engine, [(p, "smol") for p in prompts]) == want
