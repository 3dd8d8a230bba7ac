"""GPTQ: on correlated inputs it moves a layer's output less than round-to-nearest does, on
uncorrelated ones it is round-to-nearest, and `kvflock quantize --method gptq` writes a
symmetric GPTQ checkpoint, measured layer by layer, that loads and generates."""

import json

import pytest
import torch

from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM
from kvflock.worker.model.gptq import gptq_quantize
from kvflock.worker.model.quant import QuantSpec, quantize_rtn
from kvflock.worker.model.quantize_checkpoint import quantize_checkpoint


def correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose features mix a few shared directions, with a few outlier features, as
    activations of real layers do."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k // 8, generator=gen) @ torch.randn(k // 8, k, generator=gen)
    x += 0.1 * torch.randn(tokens, k, generator=gen)
    x[:, :4] *= 10
    return x


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 32, sym=True), QuantSpec(8, -1, sym=True)])
def test_gptq_moves_the_output_on_correlated_inputs_less_than_rounding_to_nearest(spec):
    k, n = 128, 64
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    x = correlated_inputs(2048, k, seed=2)
    hessian = x.t() @ x / x.shape[0]

    def output_error(codes) -> float:
        return (x @ codes.dequantize() - x @ weight.t()).pow(2).mean().item()

    gptq, rtn = output_error(gptq_quantize(weight, hessian, spec)), output_error(quantize_rtn(weight, spec))
    assert gptq < 0.7 * rtn, (gptq, rtn)


def test_with_uncorrelated_inputs_gptq_rounds_to_nearest():
    """A diagonal H leaves nothing to compensate: each weight is rounded on its own."""
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(4, 32, sym=True)
    gptq = gptq_quantize(weight, torch.diag(torch.rand(64) + 0.5), spec)
    rtn = quantize_rtn(weight, spec)
    assert torch.equal(gptq.q, rtn.q) and torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


def test_a_gptq_checkpoint_is_symmetric_gptq_format_and_generates(llama128, tmp_path):
    gen = torch.Generator().manual_seed(4)
    calibration = [torch.randint(0, 256, (48,), generator=gen).tolist() for _ in range(4)]
    out = tmp_path / "gptq"
    lines: list[str] = []
    quantize_checkpoint(llama128, out, 4, 32, progress=lines.append, calibration=calibration)
    assert any("layer 2/2: GPTQ on 192 tokens" in line for line in lines)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["sym"] is True and qc["group_size"] == 32
    llm = LLM(str(out), dtype="float32", device="cpu")
    assert llm.engine.loaded.quantization == QuantSpec(4, 32, sym=True)
    down = llm.engine.loaded.model.model.layers[1].mlp.down_proj.codes()
    assert (down.zeros == 8).all()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert len(llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids) == 8


def test_quantize_cli_refuses_gptq_without_calibration_text(llama128, tmp_path, capsys):
    from kvflock.cli import main as cli

    gptq = ["quantize", "--model", str(llama128), "--bits", "4", "--method", "gptq"]
    assert cli([*gptq, "--out", str(tmp_path / "a")]) == 2
    assert "--calibration: give a text file with --method gptq" in capsys.readouterr().err
    assert cli([*gptq, "--calibration", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "b")]) == 2
    assert "is not a file" in capsys.readouterr().err
