"""FP8 (e4m3) W8A8 linear layers on CPU, through the torch reference path: the layer equals
its dequantized matmul, a model quantized at load stays close to float, `kvflock quantize
--format fp8` writes a checkpoint that loads back exactly, both FP8 checkpoint formats that
vLLM reads are parsed (and what we cannot run is refused naming the key), and two ranks
generate what one does."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvflock.cli import main as cli
from kvflock.kernels.fp8_matmul import FP8, FP8_MAX, fp8_matmul, fp8_matmul_ref, fp8_supported, quantize_fp8_rows
from kvflock.worker.attention import TorchAttentionBackend
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.llm import LLM
from kvflock.worker.model.fp8 import CHECKPOINT_CONFIG, Fp8Linear, check_fp8_device
from kvflock.worker.model.loader import load
from kvflock.worker.model.parallel import TPGroup
from kvflock.worker.model.quant import FP8_SPEC, QUANTIZED_PROJECTIONS

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4], [200, 17, 9], [5] * 20]
# Close: for each prompt the log-probabilities of the reference's 5 likeliest first tokens (same context for both) move by under LOGPROB nats.
# On SmolLM2-135M, W8A8 per-token activations cost more than weight-only int8: mean |delta
# logprob| 0.13 against 0.04, largest 1.1 (bench/results/quantization-cpu.md).
LOGPROB = 1.0
COMPRESSED_TENSORS = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"},
    }},
}


def token_ids(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def assert_close(llm: LLM, reference: LLM, prompts: list[list[int]] = PROMPTS, tolerance: float = LOGPROB) -> None:
    top5, top20 = (SamplingParams(temperature=0.0, max_tokens=1, logprobs=n) for n in (5, 20))
    for o, r in zip(llm.generate(prompts, top20), reference.generate(prompts, top5)):
        ours, theirs = o.outputs[0].logprobs[0], r.outputs[0].logprobs[0]
        assert max(abs(ours.top.get(t, -float("inf")) - theirs.top[t]) for t in theirs.top) < tolerance


def fp8_layers(model: torch.nn.Module):
    for i, layer in enumerate(model.model.layers):
        for path in QUANTIZED_PROJECTIONS:
            parent, name = path.split(".")
            yield f"model.layers.{i}.{path}", getattr(getattr(layer, parent), name)


@pytest.fixture(scope="module")
def fp8_checkpoint(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp8") / "fp8"
    assert cli(["quantize", "--model", str(tiny_models["llama"]), "--format", "fp8", "--out", str(out)]) == 0
    return out


def test_the_reference_linear_equals_its_dequantized_matmul():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 64, generator=gen) * 0.05, torch.randn(5, 64, generator=gen)
    layer = Fp8Linear(64, 48, bias=False)
    layer.set_weight(w)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (48,)
    xq, x_scale = quantize_fp8_rows(x)
    assert torch.equal(layer(x), (xq.float() * x_scale) @ layer.dequantize().t())
    # and the product is close to the float one: e4m3 keeps 3 mantissa bits
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=0, atol=0.05 * (x @ w.t()).abs().max().item())


def test_per_channel_scales_map_each_rows_largest_value_onto_e4m3s_largest():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_fp8_rows(w)
    assert torch.equal(q.float().abs().amax(-1), torch.full((8,), FP8_MAX))
    torch.testing.assert_close(scale.squeeze(-1), w.abs().amax(-1) / FP8_MAX)


def test_smollm2_quantized_at_load_generates_close_to_float():
    llm = LLM("demo", dtype="float32", device="cpu", quantization="fp8")
    assert llm.engine.loaded.quantization == FP8_SPEC
    assert all(isinstance(m, Fp8Linear) for _, m in fp8_layers(llm.engine.loaded.model))
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "How do trains work?"]
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    assert_close(llm, LLM("demo", dtype="float32", device="cpu"), prompts)


def test_the_fp8_checkpoint_is_in_vllms_fp8_format(fp8_checkpoint, tiny_models):
    config = json.loads((fp8_checkpoint / "config.json").read_text())
    assert config["quantization_config"] == CHECKPOINT_CONFIG == {"quant_method": "fp8", "activation_scheme": "dynamic"}
    tensors = load_file(fp8_checkpoint / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.weight"].dtype == FP8 and tensors[f"{q}.weight"].shape == (64, 64)
    assert tensors[f"{q}.weight_scale"].dtype == torch.float32 and tensors[f"{q}.weight_scale"].shape == ()
    plain = load_file(tiny_models["llama"] / "model.safetensors")
    assert torch.equal(tensors["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])


def test_the_fp8_checkpoint_loads_back_exactly(fp8_checkpoint, tiny_models):
    """Its layers hold the file's e4m3 weights and scales, and it generates what a model
    quantized at load generates once given those same weights and scales."""
    tensors = load_file(fp8_checkpoint / "model.safetensors")
    llm = LLM(str(fp8_checkpoint), dtype="float32", device="cpu")
    assert llm.engine.loaded.quantization == FP8_SPEC
    at_load = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", quantization="fp8")
    copies = dict(fp8_layers(at_load.engine.loaded.model))
    for name, layer in fp8_layers(llm.engine.loaded.model):
        assert torch.equal(layer.weight.view(torch.uint8), tensors[f"{name}.weight"].view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, tensors[f"{name}.weight_scale"].expand(layer.out_features)), name
        with torch.no_grad():
            copies[name].weight.copy_(layer.weight)
            copies[name].weight_scale.copy_(layer.weight_scale)
    assert token_ids(llm) == token_ids(at_load)


def compressed_tensors_copy(fp8_checkpoint: Path, folder: Path, qc: dict) -> Path:
    """The fp8 checkpoint rewritten as compressed-tensors: per-channel scales [out, 1]."""
    shutil.copytree(fp8_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        rows = tensors[name.replace("weight_scale", "weight")].shape[0]
        tensors[name] = tensors[name].expand(rows, 1).contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_a_compressed_tensors_checkpoint_generates_what_the_same_weights_in_fp8_format_do(fp8_checkpoint, tmp_path):
    folder = compressed_tensors_copy(fp8_checkpoint, tmp_path / "ct", COMPRESSED_TENSORS)
    llm = LLM(str(folder), dtype="float32", device="cpu", quantization="fp8")
    assert llm.engine.loaded.quantization == FP8_SPEC
    assert token_ids(llm) == token_ids(LLM(str(fp8_checkpoint), dtype="float32", device="cpu"))


def group(**changes) -> dict:
    g = COMPRESSED_TENSORS["config_groups"]["group_0"]
    return {**COMPRESSED_TENSORS, "config_groups": {"group_0": {**g, **changes}}}


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "fp8", "activation_scheme": "static"}, "quantization_config.activation_scheme 'static'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "quantization_config.weight_block_size"),
    ({"quant_method": "fp8", "ignored_layers": ["model.layers.1.mlp.down_proj"]},
     "quantization_config.ignored_layers holds 'model.layers.1.mlp.down_proj'"),
    ({**COMPRESSED_TENSORS, "ignore": ["lm_head", "re:.*gate_proj"]}, "quantization_config.ignore holds 're:.*gate_proj'"),
    ({**COMPRESSED_TENSORS, "format": "pack-quantized"}, "quantization_config.format 'pack-quantized'"),
    ({**COMPRESSED_TENSORS, "kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "quantization_config.kv_cache_scheme"),
    (group(weights={"num_bits": 8, "type": "float", "strategy": "block"}), "group_0.weights.strategy 'block'"),
    (group(weights={"num_bits": 4, "type": "int", "strategy": "channel"}), "group_0.weights.num_bits 4"),
    (group(input_activations={"num_bits": 8, "type": "float", "dynamic": False}), "input_activations.dynamic False"),
])
def test_fp8_configs_kvflock_cannot_run_are_refused_naming_the_key(fp8_checkpoint, tmp_path, qc, message):
    folder = compressed_tensors_copy(fp8_checkpoint, tmp_path / "bad", qc)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("*", r"\*")):
        load(EngineConfig(model=str(folder), device="cpu"), TorchAttentionBackend())


def test_quantization_settings_that_contradict_the_checkpoint_are_refused(fp8_checkpoint, tiny_models):
    with pytest.raises(ValueError, match="quantization: 'int8' does not match .* already quantized \\(fp8 e4m3"):
        LLM(str(fp8_checkpoint), device="cpu", quantization="int8")
    with pytest.raises(ValueError, match="quantization: 'gptq' does not match"):
        LLM(str(fp8_checkpoint), device="cpu", quantization="gptq")


def test_dummy_fp8_weights_have_the_models_shapes_and_generate(tiny_models):
    llm = LLM(str(tiny_models["llama"]), load_format="dummy", quantization="fp8", dtype="float32", device="cpu")
    down = llm.engine.loaded.model.model.layers[1].mlp.down_proj
    assert isinstance(down, Fp8Linear) and down.weight.shape == (64, 128) and down.weight.dtype == FP8
    assert 0.015 < down.dequantize().std().item() < 0.025
    assert all(len(t) == GREEDY.max_tokens for t in token_ids(llm))


def test_quantize_cli_refuses_bits_with_fp8_and_fp8_checkpoints(fp8_checkpoint, tiny_models, tmp_path, capsys):
    assert cli(["quantize", "--model", str(tiny_models["llama"]), "--format", "fp8", "--bits", "4",
                "--out", str(tmp_path / "a")]) == 2
    assert "--bits/--group-size: --format fp8" in capsys.readouterr().err
    assert cli(["quantize", "--model", str(tiny_models["llama"]), "--out", str(tmp_path / "b")]) == 2
    assert "--bits: required with --format gptq" in capsys.readouterr().err
    assert cli(["quantize", "--model", str(fp8_checkpoint), "--format", "fp8", "--out", str(tmp_path / "c")]) == 2
    assert "already quantized (fp8)" in capsys.readouterr().err


def test_a_gpu_without_fp8_is_refused_at_load_naming_the_setting(monkeypatch):
    """Only the GPU is mocked: an A100 (capability 8.0) is asked for FP8."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"quantization: fp8 needs a GPU of CUDA capability 8\.9 .* A100.* is 8\.0"):
        check_fp8_device(torch.device("cuda"))


@pytest.mark.parametrize("rank", [0, 1])
def test_each_tensor_parallel_rank_loads_its_rows_and_every_row_parallel_scale(fp8_checkpoint, rank):
    full = load_file(fp8_checkpoint / "model.safetensors")
    config = EngineConfig(model=str(fp8_checkpoint), device="cpu", tensor_parallel_size=2)
    layer = load(config, TorchAttentionBackend(), TPGroup(rank, 2)).model.model.layers[0]
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    # column-parallel q_proj: 32 of the 64 output rows with their scales
    assert torch.equal(layer.self_attn.q_proj.weight.view(torch.uint8),
                       full[f"{q}.weight"][rank * 32 : (rank + 1) * 32].view(torch.uint8))
    assert layer.self_attn.q_proj.weight_scale.shape == (32,)
    # row-parallel down_proj: 64 of the 128 input features, all 64 output channels' scales
    assert torch.equal(layer.mlp.down_proj.weight.view(torch.uint8),
                       full[f"{down}.weight"][:, rank * 64 : (rank + 1) * 64].view(torch.uint8))
    assert torch.equal(layer.mlp.down_proj.weight_scale, full[f"{down}.weight_scale"].expand(64))


@pytest.mark.timeout(120)
def test_tensor_parallel_generation_equals_one_rank(fp8_checkpoint):
    """Equal up to activation rounding: each row-parallel rank scales its own slice of a token's
    activations (as vLLM does; one scale over all ranks would cost an all-reduce per layer), so
    o_proj and down_proj round differently from one rank; on this sensitive random model that
    moves the first token's top-5 log-probabilities by up to 0.33 nats."""
    reference = LLM(str(fp8_checkpoint), dtype="float32", device="cpu")
    llm = LLM(str(fp8_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        assert_close(llm, reference, tolerance=0.5)
    finally:
        llm.engine.loaded.replica.shutdown()


@pytest.mark.gpu
def test_scaled_mm_equals_the_reference_up_to_bf16_rounding():
    if not fp8_supported(torch.device("cuda")):
        pytest.skip("needs CUDA capability 8.9+")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = Fp8Linear(4096, 1024, bias=False).cuda()
    layer.set_weight(torch.randn(1024, 4096, device="cuda", generator=gen) * 0.02)
    for m in (1, 7, 64):
        x = torch.randn(m, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
        ref = fp8_matmul_ref(x.float(), layer.weight, layer.weight_scale)
        torch.testing.assert_close(fp8_matmul(x, layer.weight, layer.weight_scale).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_the_scaled_mm_path_generates_what_the_cpu_reference_path_does(fp8_checkpoint):
    if not fp8_supported(torch.device("cuda")):
        pytest.skip("needs CUDA capability 8.9+")
    cpu = token_ids(LLM(str(fp8_checkpoint), dtype="float32", device="cpu"))
    assert token_ids(LLM(str(fp8_checkpoint), dtype="bfloat16", device="cuda")) == cpu
