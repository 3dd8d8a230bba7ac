"""FP8 (e4m3) W8A8 linear layers and the FP8 checkpoint formats that vLLM reads.

A layer holds its weight as e4m3 [out, in] with one fp32 scale per output channel and
quantizes its input per token at run time (kvflock.kernels.fp8_matmul). Checkpoints:

- HF / vLLM `quant_method: "fp8"` (AutoFP8, transformers): we read `activation_scheme` (only
  "dynamic": no `input_scale` tensors), `weight_block_size` (must be absent: block scales are
  not supported) and `ignored_layers` / `modules_to_not_convert` (may name only what we keep
  unquantized anyway, e.g. lm_head). Tensors: `<prefix>.weight` (F8_E4M3) and
  `<prefix>.weight_scale` (F32, one per tensor: shape [] or [1]; or per channel: [out] or [out, 1]).
- compressed-tensors (llm-compressor) `quant_method: "compressed-tensors"` with
  `format: "float-quantized"`: one entry of `config_groups` targeting "Linear", whose
  `weights` are {num_bits: 8, type: "float", symmetric: true, dynamic: false, strategy:
  "tensor" | "channel"} and whose `input_activations` are absent or {num_bits: 8, type:
  "float", dynamic: true} (strategy "token" or "tensor"; we scale per token either way);
  `ignore` as above; `kv_cache_scheme` must be absent. Same tensor names.

`kvflock quantize --format fp8` writes the first form with one scale per tensor (what vLLM's
`fp8` method loads): config.json `{"quant_method": "fp8", "activation_scheme": "dynamic"}`.
Under tensor parallelism a column-parallel layer keeps the scales of its output rows; a
row-parallel one splits the input features and keeps every output channel's scale.
"""

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kvflock.kernels.fp8_matmul import (
    FP8,
    dequantize_fp8,
    fp8_matmul,
    fp8_matmul_ref,
    fp8_supported,
    quantize_fp8_rows,
    quantize_fp8_tensor,
)
from kvflock.worker.model.parallel import Shard, TPGroup

CHECKPOINT_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic"}


def read_fp8_config(qc: dict[str, Any], projections: list[str], where: str) -> None:
    """Check an FP8 `quantization_config` (either form above); refuses what we cannot run,
    naming the key. `projections` are the model's quantized layer names (for `ignore`)."""
    key = f"{where}: quantization_config"
    if qc.get("quant_method") == "fp8":
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"{key}.activation_scheme {qc['activation_scheme']!r} is not supported; kvflock "
                             "runs FP8 with dynamic per-token activation scales ('dynamic')")
        if qc.get("weight_block_size") is not None:
            raise ValueError(f"{key}.weight_block_size {qc['weight_block_size']!r}: block-wise FP8 scales are not "
                             "supported; kvflock reads per-tensor or per-channel weight_scale")
        _check_ignored(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or [], projections,
                       f"{key}.ignored_layers")
        return
    if qc.get("format") != "float-quantized":
        raise ValueError(f"{key}.format {qc.get('format')!r} is not supported; kvflock reads compressed-tensors "
                         "'float-quantized' (FP8) checkpoints")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"{key}.config_groups has {len(groups)} groups; kvflock reads one, targeting Linear")
    (name, group), = groups.items()
    where_group = f"{key}.config_groups.{name}"
    if "Linear" not in (group.get("targets") or []):
        raise ValueError(f"{where_group}.targets {group.get('targets')!r} must include 'Linear'")
    weights = group.get("weights") or {}
    expected = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    for field, value in expected.items():
        if weights.get(field, value) != value:
            raise ValueError(f"{where_group}.weights.{field} {weights.get(field)!r} is not supported; FP8 e4m3 "
                             f"weights need {value!r}")
    if weights.get("strategy") not in ("tensor", "channel"):
        raise ValueError(f"{where_group}.weights.strategy {weights.get('strategy')!r} is not supported; kvflock "
                         "reads 'tensor' or 'channel' weight scales")
    acts = group.get("input_activations")
    if acts is not None:
        for field, value in {"num_bits": 8, "type": "float", "dynamic": True}.items():
            if acts.get(field, value) != value:
                raise ValueError(f"{where_group}.input_activations.{field} {acts.get(field)!r} is not supported; "
                                 f"kvflock scales FP8 activations dynamically per token ({field}: {value!r})")
    if qc.get("kv_cache_scheme") is not None:
        raise ValueError(f"{key}.kv_cache_scheme is set; kvflock does not read KV cache scales from "
                         "checkpoints (use kv_cache_dtype fp8 instead)")
    _check_ignored(qc.get("ignore") or [], projections, f"{key}.ignore")


def _check_ignored(entries: list[str], projections: list[str], key: str) -> None:
    """Refuse a list of unquantized modules that names a projection: kvflock quantizes all of them."""
    for entry in entries:
        pattern = entry[3:] if entry.startswith("re:") else re.escape(entry)
        hit = next((p for p in projections if re.fullmatch(pattern, p)), None)
        if hit is not None:
            raise ValueError(f"{key} holds {entry!r}, which leaves {hit} unquantized; kvflock runs every "
                             "decoder projection in FP8 (only lm_head and the embedding may stay unquantized)")


def check_fp8_device(device: torch.device) -> None:
    """Refuse FP8 on a GPU that cannot multiply in FP8 (the CPU runs the torch reference)."""
    if device.type == "cuda" and not fp8_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"quantization: fp8 needs a GPU of CUDA capability 8.9 or later (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Use quantization int8 or "
                         f"int4, or an unquantized checkpoint")


class Fp8Linear(nn.Module):
    """A column- or row-parallel linear layer with e4m3 weights and per-output-channel scales.

    `group` set makes it row-parallel (input features split, partial products all-reduced);
    otherwise column-parallel (or the whole layer). On CUDA it runs torch._scaled_mm, elsewhere
    the torch reference. `shards` tells the loader which slice of `weight` this rank holds;
    `weight_scale` is sliced by `expand_scales` (checkpoints store it in several shapes).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: TPGroup | None = None,
        shard: Shard | None = None, bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group, self.in_features, self.out_features = group, in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        self.shards = {} if shard is None else {"weight": shard, **({"bias": shard} if shard.dim == 0 else {})}
        # The output channels [start, stop) of the checkpoint's `full` this rank keeps scales for.
        self.scale_rows = shard if shard is not None and shard.dim == 0 else Shard(0, 0, out_features, out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as `dtype` [out, in]."""
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = fp8_matmul if self.weight.is_cuda else fp8_matmul_ref
        y = matmul(x, self.weight, self.weight_scale)
        if self.group is not None and self.group.distributed:
            y = self.group.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float [out, in] weight, one scale per output channel."""
        q, scale = quantize_fp8_rows(weight.detach())
        with torch.no_grad():
            self.weight.copy_(q)
            self.weight_scale.copy_(scale.squeeze(-1))

    def fill_random(self, gen: torch.Generator) -> None:
        """Random weights of std 0.02 (as dummy weights are), quantized per channel."""
        w = torch.empty(self.weight.shape, device=self.weight.device).normal_(0.0, 0.02, generator=gen)
        self.set_weight(w)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    @classmethod
    def fuse(cls, parts: list["Fp8Linear"]) -> "Fp8Linear":
        """One layer whose output is the parts' outputs side by side (e.g. [q | k | v]); the
        parts then hold row views of its tensors, so nothing is stored twice."""
        with torch.device("meta"):  # its tensors are set below
            fused = cls(parts[0].in_features, sum(p.out_features for p in parts), False)
        for name in ("weight", "weight_scale"):
            whole = torch.cat([getattr(p, name).data for p in parts])
            setattr(fused, name, nn.Parameter(whole, requires_grad=False))
            for part, view in zip(parts, whole.split([p.out_features for p in parts])):
                getattr(part, name).data = view
        return fused


def quantize_for_checkpoint(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale of shape []) as `kvflock quantize --format fp8` writes them."""
    return quantize_fp8_tensor(weight.detach())


def expand_scales(
    tensors: Iterator[tuple[str, tuple[int, ...], torch.Tensor]], layers: dict[str, Fp8Linear], where: str
) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    """The checkpoint's tensors with each `<prefix>.weight_scale` (per tensor or per channel,
    any of the shapes above) turned into this rank's per-channel scales [rows]."""
    for name, shape, part in tensors:
        prefix = name.removesuffix(".weight_scale")
        if prefix == name or prefix not in layers:
            yield name, shape, part
            continue
        rows = layers[prefix].scale_rows
        scale = part[...].float().reshape(-1)  # a safetensors slice reads here
        if scale.numel() == 1:
            scale = scale.expand(rows.full)
        elif scale.numel() != rows.full:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(shape)}; expected one scale per tensor or "
                             f"one per output channel ({rows.full})")
        local = scale[rows.start : rows.stop]
        yield name, tuple(local.shape), local
