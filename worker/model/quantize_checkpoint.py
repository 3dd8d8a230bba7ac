"""`kvflock quantize`: turn a plain Hugging Face checkpoint (bf16, fp16 or fp32 safetensors)
into a GPTQ-format (int4/int8) or FP8 one that kvflock, vLLM and other readers load: by
round-to-nearest, or for GPTQ format by the GPTQ algorithm on calibration text
(kvflock.worker.model.gptq).

GPTQ: the decoder's projections become `<prefix>.qweight/.qzeros/.scales/.g_idx` (GPTQ v1,
act-order off, symmetric: docs/quantization.md says which `quantization_config` fields are
written and why vLLM accepts them). FP8: they become `<prefix>.weight` (e4m3) and
`<prefix>.weight_scale` (fp32, one per tensor), the format kvflock.worker.model.fp8 describes.
Every other tensor is copied as it is; config.json gains a `quantization_config`; the tokenizer
and generation files are copied beside them.
"""

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvflock.kernels.quant_matmul import pack_factor
from kvflock.worker.attention import TorchAttentionBackend
from kvflock.worker.config import EngineConfig, ModelConfig
from kvflock.worker.model import fp8
from kvflock.worker.model.gptq import calibrate
from kvflock.worker.model.loader import load, read_safetensors
from kvflock.worker.model.quant import (
    FP8_SPEC,
    QUANTIZED_PROJECTIONS,
    QuantSpec,
    gptq_config,
    quantize_rtn,
)
from kvflock.worker.model.quant_formats import Codes, gptq_encode, trivial_g_idx
from kvflock.worker.model.source import ModelSource
from kvflock.worker.model.tokenizer import load_tokenizer

_PROJECTION = re.compile(r"model\.layers\.(\d+)\.(" + "|".join(re.escape(p) for p in QUANTIZED_PROJECTIONS) + r")\.weight")
_CHECKPOINT_FILES = re.compile(r".*\.safetensors|model\.safetensors\.index\.json|config\.json")
SHARD_BYTES = 4 << 30


def default_group_size(bits: int) -> int:
    """int4 in groups of 128 input features, int8 per output channel."""
    return 128 if bits == 4 else -1


def quantize_checkpoint(
    model: Path, out: Path, bits: int | None, group_size: int | None = None, device: str = "cpu",
    progress: Callable[[str], None] = print, shard_bytes: int = SHARD_BYTES, fmt: str = "gptq",
    calibration: list[list[int]] | None = None,
) -> QuantSpec:
    """Write `model` quantized (`fmt` gptq: to `bits`, by GPTQ on the `calibration` token
    sequences when given, else round-to-nearest; fp8: e4m3) into the new folder `out`;
    returns what it wrote."""
    if fmt == "fp8":
        spec = FP8_SPEC
    else:
        assert bits is not None
        spec = QuantSpec(bits, default_group_size(bits) if group_size is None else group_size, sym=True)
    hf = _read_plain_config(model)
    cfg = ModelConfig.from_hf(hf)
    if not spec.fp8:
        _check_dimensions(cfg, spec)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {out} already exists and is not an empty folder; choose a new one")
    gptq_codes = _gptq_codes(model, spec, calibration, device, progress) if calibration is not None else {}
    out.mkdir(parents=True, exist_ok=True)

    done: dict[int, int] = {}
    writer = _ShardWriter(out, shard_bytes)
    for name, tensor in read_safetensors(model):
        match = _PROJECTION.fullmatch(name)
        if match is None:
            writer.add(name, tensor)
            continue
        prefix = name.removesuffix(".weight")
        if spec.fp8:
            weight, scale = fp8.quantize_for_checkpoint(tensor.to(device))
            writer.add(name, weight.cpu())
            writer.add(f"{prefix}.weight_scale", scale.cpu())
        else:
            codes = gptq_codes.pop(prefix) if gptq_codes else quantize_rtn(tensor.to(device), spec)
            for field, packed in gptq_encode(codes).items():
                writer.add(f"{prefix}.{field}", packed.cpu())
            writer.add(f"{prefix}.g_idx", trivial_g_idx(tensor.shape[1], spec.group_size))
        layer = int(match.group(1))
        done[layer] = done.get(layer, 0) + 1
        if done[layer] == len(QUANTIZED_PROJECTIONS):
            progress(f"layer {layer + 1}/{cfg.num_layers}: quantized to {spec.label}")
    writer.close()
    if len(done) != cfg.num_layers:
        raise ValueError(f"model: {model} holds projections of {len(done)} layers, config.json says {cfg.num_layers}")

    quantization_config = fp8.CHECKPOINT_CONFIG if spec.fp8 else gptq_config(spec)
    (out / "config.json").write_text(json.dumps({**hf, "quantization_config": quantization_config}, indent=2) + "\n")
    for path in sorted(model.iterdir()):
        if path.is_file() and not _CHECKPOINT_FILES.fullmatch(path.name):
            shutil.copy2(path, out / path.name)
    progress(f"wrote {out} ({spec.label}, {writer.num_files} safetensors file(s))")
    return spec


def calibration_sequences(model: Path, text: str, length: int, count: int) -> list[list[int]]:
    """Up to `count` sequences of `length` tokens of `text`, tokenized as the model does."""
    tokenizer = load_tokenizer(ModelSource("hf", model))
    if tokenizer is None:
        raise ValueError(f"calibration: {model} has no tokenizer files to read the calibration text with")
    ids = tokenizer.encode(text, add_special_tokens=False)
    sequences = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:count]
    if not sequences:
        raise ValueError(f"calibration: the text holds {len(ids)} tokens, fewer than one sequence of {length}")
    return sequences


def _gptq_codes(model: Path, spec: QuantSpec, calibration: list[list[int]], device: str,
                progress: Callable[[str], None]) -> dict[str, Codes]:
    """GPTQ's codes of every projection, measured with the model on `device`."""
    loaded = load(EngineConfig(model=str(model), load_format="hf", device=device), TorchAttentionBackend())
    return calibrate(loaded.model, calibration, spec, progress)


def _read_plain_config(model: Path) -> dict[str, Any]:
    config_path = model / "config.json"
    if not model.is_dir():
        raise FileNotFoundError(f"model: {model} is not a folder (give a Hugging Face checkpoint folder)")
    if not config_path.exists():
        raise FileNotFoundError(f"model: {model} has no config.json (give a Hugging Face checkpoint folder)")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "unknown")
        raise ValueError(f"model: {model} is already quantized ({method}); quantize its unquantized checkpoint")
    return hf


def _check_dimensions(cfg: ModelConfig, spec: QuantSpec) -> None:
    """Every projection's input features split into whole groups and both sides pack evenly."""
    p = pack_factor(spec.bits)
    if spec.group_size != -1 and (spec.group_size < 16 or spec.group_size & (spec.group_size - 1)):
        raise ValueError(f"group_size: {spec.group_size} must be -1 (per channel) or a power of two >= 16")
    shapes = {
        "q_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
        "k_proj/v_proj": (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim),
        "o_proj": (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
        "gate_proj/up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    for name, (k, n) in shapes.items():
        if spec.group_size > 0 and k % spec.group_size:
            raise ValueError(f"group_size: {name} has {k} input features, not a multiple of {spec.group_size}; "
                             f"use a group size that divides it, or -1 (per channel)")
        if k % 16 or n % p:
            raise ValueError(f"bits: {name} is {n}x{k}; int{spec.bits} packs {p} values per int32 and the kernels "
                             f"take input features in tiles of 16 or more: {k} must be a multiple of 16, {n} of {p}")


class _ShardWriter:
    """Safetensors files of at most about `shard_bytes` each, named as transformers names them,
    with an index when there is more than one."""

    def __init__(self, out: Path, shard_bytes: int) -> None:
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []

    @property
    def num_files(self) -> int:
        return len(self.files)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
