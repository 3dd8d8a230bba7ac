"""Weight-only quantization end to end on CPU: `kvflock quantize` writes a GPTQ checkpoint, the
loader reads it back bit-exactly into QuantizedLinear layers, and the quantized model generates
exactly what a float32 model holding the dequantized weights generates. Bad inputs are refused
naming the field."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvflock.cli import main as cli
from kvflock.worker.attention import TorchAttentionBackend
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.llm import LLM
from kvflock.worker.model.loader import load
from kvflock.worker.model.parallel import TPGroup
from kvflock.worker.model.quant import QUANTIZED_PROJECTIONS, QuantizedLinear, QuantSpec, quantize_rtn
from kvflock.worker.model.quant_formats import gptq_decode
from kvflock.worker.model.quantize_checkpoint import quantize_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4], [200, 17, 9], [5] * 20]


@pytest.fixture(scope="module")
def quantized(llama128, tmp_path_factory) -> dict[str, Path]:
    """The same checkpoint as int4 (groups of 128) and int8 (per channel), via the CLI, and as
    int4 in groups of 32 (which two ranks can split: o_proj has 64 input features per rank)."""
    root = tmp_path_factory.mktemp("quantized")
    paths = {}
    for bits in (4, 8):
        paths[f"int{bits}"] = root / f"int{bits}"
        assert cli(["quantize", "--model", str(llama128), "--bits", str(bits), "--out", str(paths[f"int{bits}"])]) == 0
    paths["int4-g32"] = root / "int4-g32"
    quantize_checkpoint(llama128, paths["int4-g32"], 4, 32, progress=lambda _: None)
    return paths


def projections(model: torch.nn.Module):
    for i, layer in enumerate(model.model.layers):
        for path in QUANTIZED_PROJECTIONS:
            parent, name = path.split(".")
            yield f"model.layers.{i}.{path}", getattr(getattr(layer, parent), name)


def token_ids(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("fmt,spec", [("int4", QuantSpec(4, 128, sym=True)), ("int8", QuantSpec(8, -1, sym=True))])
def test_a_quantized_checkpoint_loads_back_bit_exactly(llama128, quantized, fmt, spec):
    plain = load_file(llama128 / "model.safetensors")
    loaded = load(EngineConfig(model=str(quantized[fmt]), device="cpu"), TorchAttentionBackend())
    assert loaded.quantization == spec
    for name, module in projections(loaded.model):
        assert isinstance(module, QuantizedLinear)
        expected, codes = quantize_rtn(plain[f"{name}.weight"], spec), module.codes()
        for field in ("q", "zeros", "scales"):
            assert torch.equal(getattr(codes, field), getattr(expected, field)), (name, field)
        assert torch.equal(module.dequantize(), expected.dequantize().t())


def test_the_checkpoint_is_gptq_format_with_the_tokenizer_files(quantized, llama128):
    folder = quantized["int4"]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                             "sym": True, "checkpoint_format": "gptq", "lm_head": False}
    tensors = load_file(folder / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.qweight"].shape == (128 // 8, 128) and tensors[f"{q}.qweight"].dtype == torch.int32
    assert tensors[f"{q}.qzeros"].shape == (1, 128 // 8) and tensors[f"{q}.scales"].dtype == torch.float16
    assert (tensors[f"{q}.qzeros"] == 0x77777777).all()  # symmetric: zero point 8, stored as 8 - 1
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.g_idx"], torch.arange(256, dtype=torch.int32) // 128)
    assert f"{q}.weight" not in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], load_file(llama128 / "model.safetensors")["model.embed_tokens.weight"])
    assert (folder / "special_tokens_map.json").exists() and (folder / "generation_config.json").exists()


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_generation_equals_a_float32_model_of_the_dequantized_weights(llama128, quantized, fmt):
    llm = LLM(str(quantized[fmt]), dtype="float32", device="cpu")
    reference = LLM(str(llama128), dtype="float32", device="cpu")
    spec = llm.engine.loaded.quantization
    quant_modules = dict(projections(llm.engine.loaded.model))
    with torch.no_grad():
        for name, module in projections(reference.engine.loaded.model):
            module.weight.copy_(quant_modules[name].dequantize())
    assert token_ids(llm) == token_ids(reference)


def test_quantizing_at_load_holds_round_to_nearest_codes_of_the_plain_weights(llama128):
    """At load int4 is asymmetric (more exact than the symmetric checkpoints `kvflock quantize`
    writes for other readers)."""
    plain = load_file(llama128 / "model.safetensors")
    at_load = LLM(str(llama128), dtype="float32", device="cpu", quantization="int4")
    assert at_load.engine.loaded.quantization == QuantSpec(4, 128)
    for name, module in projections(at_load.engine.loaded.model):
        assert torch.equal(module.codes().q, quantize_rtn(plain[f"{name}.weight"], QuantSpec(4, 128)).q), name
    assert all(len(t) == GREEDY.max_tokens for t in token_ids(at_load))


@pytest.mark.parametrize("fmt,bits", [("int4", 4), ("int8", 8)])
def test_dummy_quantized_weights_have_the_models_shapes_and_generate(llama128, fmt, bits):
    llm = LLM(str(llama128), load_format="dummy", quantization=fmt, dtype="float32", device="cpu")
    gate = llm.engine.loaded.model.model.layers[1].mlp.gate_proj
    assert isinstance(gate, QuantizedLinear) and gate.spec.bits == bits
    assert gate.words.shape == (1, 256, 128 * bits // 32) and gate.words.dtype == torch.int32  # one tile of 128
    w = gate.dequantize()
    assert 0.01 < w.std().item() < 0.04 and w.mean().abs().item() < 0.01
    assert all(len(t) == GREEDY.max_tokens for t in token_ids(llm))


@pytest.mark.parametrize("rank", [0, 1])
def test_each_tensor_parallel_rank_loads_its_slice_of_the_packed_weights(quantized, rank):
    full = load_file(quantized["int4-g32"] / "model.safetensors")

    def checkpoint_codes(prefix: str):
        return gptq_decode(full[f"{prefix}.qweight"], full[f"{prefix}.qzeros"], full[f"{prefix}.scales"], 4, 32)

    config = EngineConfig(model=str(quantized["int4-g32"]), device="cpu", tensor_parallel_size=2)
    model = load(config, TorchAttentionBackend(), TPGroup(rank, 2)).model
    layer = model.model.layers[0]
    q, down = checkpoint_codes("model.layers.0.self_attn.q_proj"), checkpoint_codes("model.layers.0.mlp.down_proj")
    # column-parallel q_proj: half of the 128 output features
    got = layer.self_attn.q_proj.codes()
    assert torch.equal(got.q, q.q[:, rank * 64 : (rank + 1) * 64])
    assert torch.equal(got.zeros, q.zeros[:, rank * 64 : (rank + 1) * 64])
    # row-parallel down_proj: half of the 256 input features, 4 groups of 32 each
    got = layer.mlp.down_proj.codes()
    assert torch.equal(got.q, down.q[rank * 128 : (rank + 1) * 128])
    assert torch.equal(got.scales, down.scales[rank * 4 : (rank + 1) * 4])
    assert torch.equal(got.zeros, down.zeros[rank * 4 : (rank + 1) * 4])


@pytest.mark.timeout(120)
def test_tensor_parallel_generation_equals_one_rank(quantized):
    """Row-parallel ranks each multiply their groups and sum: equal to one rank up to float
    rounding, which random logits this far apart do not feel."""
    reference = token_ids(LLM(str(quantized["int4-g32"]), dtype="float32", device="cpu"))
    llm = LLM(str(quantized["int4-g32"]), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        assert token_ids(llm) == reference
    finally:
        llm.engine.loaded.replica.shutdown()


def test_quantization_gptq_on_a_plain_checkpoint_is_refused(llama128):
    with pytest.raises(ValueError, match="quantization: 'gptq' needs a checkpoint quantized so"):
        LLM(str(llama128), device="cpu", quantization="gptq")


def test_quantizing_an_already_quantized_checkpoint_at_load_is_refused(quantized):
    with pytest.raises(ValueError, match="quantization: 'int8'.*already quantized"):
        LLM(str(quantized["int4"]), device="cpu", quantization="int8")


def test_an_unknown_quantization_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model="demo", quantization="nf4")


def test_int4_at_load_refuses_layers_that_groups_of_128_do_not_divide(tiny_models):
    with pytest.raises(ValueError, match="quantization: model.layers.0.self_attn.q_proj has 64 input and 64 output features"):
        LLM(str(tiny_models["llama"]), device="cpu", quantization="int4")


def test_act_order_checkpoints_are_refused(quantized, tmp_path):
    folder = tmp_path / "act-order"
    folder.mkdir()
    config = json.loads((quantized["int8"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(quantized["int8"] / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.g_idx"] = torch.randperm(128).to(torch.int32) % 2
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj.g_idx reorders input features"):
        load(EngineConfig(model=str(folder), device="cpu"), TorchAttentionBackend())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {**config["quantization_config"], "desc_act": True}}))
    with pytest.raises(ValueError, match="desc_act"):
        load(EngineConfig(model=str(folder), device="cpu"), TorchAttentionBackend())


def test_quantize_cli_refuses_bad_inputs_clearly(llama128, quantized, tiny_models, tmp_path, capsys):
    def error(*args: str) -> str:
        assert cli(["quantize", *args]) == 2
        return capsys.readouterr().err

    assert "is not a folder" in error("--model", str(tmp_path / "missing"), "--bits", "4", "--out", str(tmp_path / "a"))
    assert "already quantized" in error("--model", str(quantized["int4"]), "--bits", "8", "--out", str(tmp_path / "b"))
    assert "group_size: q_proj has 64 input features, not a multiple of 128" in error(
        "--model", str(tiny_models["llama"]), "--bits", "4", "--out", str(tmp_path / "c"))
    assert "already exists" in error("--model", str(llama128), "--bits", "8", "--out", str(quantized["int8"]))
    assert not (tmp_path / "c").exists()


def test_a_sharded_output_has_an_index_the_loader_reads(llama128, tmp_path):
    out = tmp_path / "sharded"
    quantize_checkpoint(llama128, out, 8, shard_bytes=64 << 10, progress=lambda _: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load(EngineConfig(model=str(out), device="cpu"), TorchAttentionBackend())
    q = loaded.model.model.layers[1].self_attn.q_proj
    plain = load_file(llama128 / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q.dequantize(), quantize_rtn(plain, QuantSpec(8, -1, sym=True)).dequantize().t())


@pytest.mark.parametrize("sym", [False, True])
def test_round_to_nearest_error_is_at_most_half_a_step(sym):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3, :128] = w[3, :128].abs()  # a group without negative values (zero point 1 in GPTQ v1)
    spec = QuantSpec(4, 128, sym=sym)
    codes = quantize_rtn(w, spec)
    step = codes.scales.float().repeat_interleave(128, 0).t()
    # symmetric: the largest positive value sits exactly half a step above code 15; the float16
    # rounding of the scale (a part in 2048 of 7.5 steps) can add under 1% of a step to that
    assert ((codes.dequantize().t() - w).abs() <= step / 2 * 1.01 + 1e-6).all()
    assert torch.equal(codes.pack().dequantize(), codes.dequantize())
    assert (codes.zeros >= 1).all() and (not sym or (codes.zeros == 8).all())


def test_a_fused_projection_multiplies_like_its_parts():
    """[gate | up] and [q | k | v] run as one kernel call over the parts' concatenated packed
    tensors; the parts keep working on column views of them (Triton's interpreter on CPU), on
    the GEMV (3 rows) and the GEMM (9 rows) path."""
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    parts = []
    for width in (64, 32, 32):
        layer = QuantizedLinear(128, width, False, QuantSpec(4, 32), triton=True)
        layer.set_codes(quantize_rtn(torch.randn(width, 128, generator=gen) * 0.05, layer.spec))
        parts.append(layer.to(device))
    for rows in (3, 9):
        x = torch.randn(rows, 128, generator=gen).to(device)
        separate = torch.cat([p(x) for p in parts], dim=-1)
        fused = QuantizedLinear.fuse(parts)
        torch.testing.assert_close(fused(x), separate, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), separate)


@pytest.mark.gpu
def test_the_triton_path_generates_what_the_cpu_reference_path_does(quantized):
    for fmt in ("int4", "int8"):
        cpu = token_ids(LLM(str(quantized[fmt]), dtype="float32", device="cpu"))
        assert token_ids(LLM(str(quantized[fmt]), dtype="float32", device="cuda")) == cpu
