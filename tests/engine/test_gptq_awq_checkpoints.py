"""GPTQ and AWQ checkpoints, written here tensor by tensor in each format's own names and bit
layout (packed by this file, not by kvflock's encoders), load into the kernels' layout with
exactly the weights their formats define, and generate what a float32 model of those weights
generates.

transformers cannot run either format on CPU (it needs GPTQModel / AutoAWQ and their CUDA
kernels, not installed here), so the reference is our own unquantized model holding the
dequantized weights, which tests/engine/test_greedy_matches_transformers.py holds to
transformers.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvflock.worker.attention import TorchAttentionBackend
from kvflock.worker.config import EngineConfig
from kvflock.worker.llm import LLM
from kvflock.worker.model.loader import load
from kvflock.worker.model.parallel import TPGroup
from kvflock.worker.model.quant import QUANTIZED_PROJECTIONS, QuantizedLinear, QuantSpec

from .test_quantization import projections, token_ids

GROUP = 32
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: output 8c + order[b] in nibble b of word c


def rtn_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes [k, n], zero points [G, n] (0..15) and float16 scales [G, n] of a
    [n, k] weight, groups of GROUP input features."""
    n, k = weight.shape
    w = weight.t().reshape(k // GROUP, GROUP, n)
    low, high = w.amin(1), w.amax(1)
    scales = ((high - low) / 15).half()
    zeros = torch.round(-low / scales.float()).clamp(0, 15)
    q = (torch.round(w / scales.float().unsqueeze(1)) + zeros.unsqueeze(1)).clamp(0, 15)
    return q.reshape(k, n).to(torch.int64), zeros.to(torch.int64), scales


def or_fields(words: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns as the int32 a checkpoint stores."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(q, zeros, scales) -> dict[str, torch.Tensor]:
    """GPTQ v1: qweight [k/8, n] with input 8r + b at nibble b of row r; qzeros [G, n/8] holding
    zero - 1, output 8c + b at nibble b of word c."""
    k, n = q.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    qzeros = torch.zeros(zeros.shape[0], n // 8, dtype=torch.int64)
    for b in range(8):
        qweight |= q[b::8] << (4 * b)
        qzeros |= (zeros[:, b::8] - 1) << (4 * b)
    return {"qweight": or_fields(qweight), "qzeros": or_fields(qzeros), "scales": scales,
            "g_idx": torch.arange(k, dtype=torch.int32) // GROUP}


def awq_tensors(q, zeros, scales) -> dict[str, torch.Tensor]:
    """AWQ gemm: qweight [k, n/8] and qzeros [G, n/8], zero points as they are, output
    8c + AWQ_PACK_ORDER[b] at nibble b of word c."""
    qweight = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64)
    for b, column in enumerate(AWQ_PACK_ORDER):
        qweight |= q[:, column::8] << (4 * b)
        qzeros |= zeros[:, column::8] << (4 * b)
    return {"qweight": or_fields(qweight), "qzeros": or_fields(qzeros), "scales": scales}


CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None},
}


@pytest.fixture(scope="module")
def checkpoints(llama128, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Each format's checkpoint of llama128 and the float32 [n, k] weights it stands for."""
    plain = load_file(llama128 / "model.safetensors")
    dequantized, out = {}, {}
    for fmt, writer in (("gptq", gptq_tensors), ("awq", awq_tensors)):
        folder = tmp_path_factory.mktemp(fmt) / fmt
        folder.mkdir()
        tensors = {}
        for name, tensor in plain.items():
            prefix = name.removesuffix(".weight")
            if not any(prefix.endswith(p) for p in QUANTIZED_PROJECTIONS):
                tensors[name] = tensor
                continue
            q, zeros, scales = rtn_codes(tensor)
            if fmt == "gptq":
                zeros = zeros.clamp(min=1)  # v1 cannot store zero point 0
            tensors.update({f"{prefix}.{field}": t for field, t in writer(q, zeros, scales).items()})
            group_of = torch.arange(q.shape[0]) // GROUP
            dequantized[prefix] = ((q - zeros[group_of]).float() * scales[group_of].float()).t()
        save_file(tensors, str(folder / "model.safetensors"))
        config = json.loads((llama128 / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": CONFIGS[fmt]}))
        out[fmt] = (folder, dict(dequantized))
    return out


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_a_checkpoint_loads_exactly_the_weights_its_format_defines(checkpoints, fmt):
    folder, weights = checkpoints[fmt]
    loaded = load(EngineConfig(model=str(folder), device="cpu"), TorchAttentionBackend())
    assert loaded.quantization == QuantSpec(4, GROUP, method=fmt)
    for name, module in projections(loaded.model):
        assert isinstance(module, QuantizedLinear)
        assert torch.equal(module.dequantize(), weights[name]), name


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_greedy_output_equals_a_float32_model_of_the_dequantized_weights(llama128, checkpoints, fmt):
    folder, weights = checkpoints[fmt]
    reference = LLM(str(llama128), dtype="float32", device="cpu")
    with torch.no_grad():
        for name, module in projections(reference.engine.loaded.model):
            module.weight.copy_(weights[name])
    assert token_ids(LLM(str(folder), dtype="float32", device="cpu")) == token_ids(reference)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_tensor_parallel_rank_loads_its_slice_of_an_awq_checkpoint(checkpoints, rank):
    folder, weights = checkpoints["awq"]
    config = EngineConfig(model=str(folder), device="cpu", tensor_parallel_size=2)
    layer = load(config, TorchAttentionBackend(), TPGroup(rank, 2)).model.model.layers[1]
    # column-parallel q_proj: half of the 128 output features; row-parallel down_proj: half of
    # the 256 input features (4 groups of 32)
    q = weights["model.layers.1.self_attn.q_proj"][rank * 64 : (rank + 1) * 64]
    assert torch.equal(layer.self_attn.q_proj.dequantize(), q)
    down = weights["model.layers.1.mlp.down_proj"][:, rank * 128 : (rank + 1) * 128]
    assert torch.equal(layer.mlp.down_proj.dequantize(), down)


def test_an_awq_checkpoint_runs_the_triton_kernels_like_the_reference(checkpoints):
    """The GEMV and GEMM paths (Triton's interpreter on CPU) on the repacked AWQ weights."""
    pytest.importorskip("triton")
    folder, _ = checkpoints["awq"]
    model = load(EngineConfig(model=str(folder), device="cpu"), TorchAttentionBackend()).model
    layer = model.model.layers[0].mlp.down_proj
    for rows in (1, 7):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        reference = layer(x)
        layer.triton = True
        torch.testing.assert_close(layer(x), reference, atol=1e-4, rtol=1e-4)
        layer.triton = False


@pytest.mark.parametrize("field,value,message", [
    ("version", "gemv", "quantization_config.version 'gemv' is not supported"),
    ("bits", 8, "quantization_config.bits 8 is not supported for awq"),
    ("zero_point", False, "quantization_config.zero_point is false"),
    ("modules_to_not_convert", ["down_proj"], "modules_to_not_convert holds 'down_proj'"),
    ("group_size", 48, "quantization_config.group_size 48"),
])
def test_awq_configs_kvflock_cannot_run_are_refused_naming_the_field(checkpoints, tmp_path, field, value, message):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoints["awq"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load(EngineConfig(model=str(folder), device="cpu"), TorchAttentionBackend())


def test_quantization_awq_requires_an_awq_checkpoint(llama128, checkpoints):
    assert LLM(str(checkpoints["awq"][0]), device="cpu", quantization="awq").engine.loaded.quantization.method == "awq"
    with pytest.raises(ValueError, match="quantization: 'awq' needs a checkpoint quantized so"):
        LLM(str(llama128), device="cpu", quantization="awq")
    with pytest.raises(ValueError, match="quantization: 'gptq' does not match"):
        LLM(str(checkpoints["awq"][0]), device="cpu", quantization="gptq")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_the_triton_kernels_generate_what_the_cpu_reference_path_does(checkpoints, fmt):
    folder, _ = checkpoints[fmt]
    cpu = token_ids(LLM(str(folder), dtype="float32", device="cpu"))
    assert token_ids(LLM(str(folder), dtype="float32", device="cuda")) == cpu
