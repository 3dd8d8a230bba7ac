"""Quantization of the decoder's linear layers: weight-only int8 with one scale per output
column, int4 with a scale and zero point per group of 128 input features, and FP8 e4m3 W8A8
(kvflock.worker.model.fp8, which documents its checkpoint formats).

Weights are kept in GPTQ's packed layout (kvflock.kernels.quant_matmul documents it), whether
they come from a GPTQ checkpoint (`<prefix>.qweight/.qzeros/.scales/.g_idx`, config.json's
`quantization_config` with `quant_method: gptq`), from the round-to-nearest quantizer here
(`kvflock quantize`, or `quantization: int8|int4` at load), or are random (dummy weights for
benchmarks). The embedding, the norms and the LM head stay in the model's dtype.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvflock.kernels.quant_matmul import (
    dequantize,
    pack_columns,
    pack_factor,
    pack_rows,
    quant_matmul,
    quant_matmul_ref,
)
from kvflock.worker.model.fp8 import Fp8Linear, read_fp8_config
from kvflock.worker.model.parallel import ColumnParallelLinear, RowParallelLinear, Shard, TPGroup

# The projections that are quantized, by their name in a decoder layer.
QUANTIZED_PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
SCALES_DTYPE = torch.float16  # what GPTQ checkpoints store, and what we keep (more precise than bf16)


@dataclass(frozen=True)
class QuantSpec:
    """How one model's linear weights are quantized."""

    bits: int
    group_size: int  # input features per scale; -1: one group over all of them (per channel)
    fp8: bool = False  # e4m3 weights and activations (Fp8Linear) rather than GPTQ-packed integers

    @property
    def label(self) -> str:
        if self.fp8:
            return "fp8 e4m3 (per channel, dynamic per-token activations)"
        groups = "per channel" if self.group_size < 0 else f"groups of {self.group_size}"
        return f"int{self.bits} ({groups})"


FP8_SPEC = QuantSpec(8, -1, fp8=True)
# What `quantization: int8|int4|fp8` quantizes to at load (and for dummy weights).
RTN_SPECS = {"int8": QuantSpec(8, -1), "int4": QuantSpec(4, 128), "fp8": FP8_SPEC}


def read_quantization_config(hf_config: dict[str, Any], where: str) -> QuantSpec | None:
    """The QuantSpec of a config.json's `quantization_config`, None when there is none.
    Refuses what the kernels cannot run, naming the key."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method in ("fp8", "compressed-tensors"):
        layers = [f"model.layers.{i}.{p}" for i in range(hf_config.get("num_hidden_layers", 0))
                  for p in QUANTIZED_PROJECTIONS]
        read_fp8_config(qc, layers, where)
        return FP8_SPEC
    if method != "gptq":
        raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported; kvflock runs "
                         "'gptq', 'fp8' and 'compressed-tensors' (float-quantized)")
    bits, group_size = qc.get("bits"), qc.get("group_size", 128)
    if bits not in (4, 8):
        raise ValueError(f"{where}: quantization_config.bits {bits!r} is not supported; use 4 or 8")
    if not isinstance(group_size, int) or (group_size != -1 and (group_size < 16 or group_size & (group_size - 1))):
        raise ValueError(f"{where}: quantization_config.group_size {group_size!r} must be -1 or a power of two >= 16")
    if qc.get("desc_act"):
        raise ValueError(f"{where}: quantization_config.desc_act is true (act-order); kvflock needs desc_act false")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{where}: quantization_config.checkpoint_format {qc['checkpoint_format']!r} is not "
                         "supported; kvflock reads 'gptq' (v1: qzeros store zero - 1)")
    return QuantSpec(bits, group_size)


def gptq_config(spec: QuantSpec) -> dict[str, Any]:
    """The `quantization_config` that describes checkpoints written by `quantize_rtn`."""
    return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": False,
            "sym": False, "checkpoint_format": "gptq"}


@dataclass
class QuantizedWeight:
    """One linear layer's packed weight (layout: kvflock.kernels.quant_matmul)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor

    def dequantize(self, spec: QuantSpec) -> torch.Tensor:
        """The weight as float32 [n, k] (out, in), as torch's linear layers hold it."""
        return dequantize(self.qweight, self.scales, self.qzeros, spec.bits, spec.group_size).t()


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest, asymmetric: per group, [min, max] (widened to hold 0) maps onto
    [0, 2**bits - 1]. `weight` is [n, k] (out, in)."""
    n, k = weight.shape
    group = k if spec.group_size < 0 else spec.group_size
    if k % group:
        raise ValueError(f"weight: {k} input features are not a multiple of the group size {group}")
    maxq = 2**spec.bits - 1
    w = weight.detach().float().t().reshape(k // group, group, n)
    low, high = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scale = (high - low) / maxq
    zero = torch.round(-low / torch.where(scale > 0, scale, 1))
    # GPTQ v1 stores zero - 1, so a zero point of 0 does not exist there: a group without
    # negative values maps [0, max] onto [1, maxq] instead.
    no_negatives = zero < 1
    scale = torch.where(no_negatives, high / (maxq - 1), scale)
    zero = torch.where(no_negatives, 1, zero)
    scale = torch.where(scale > 0, scale, 1).to(SCALES_DTYPE)  # round first: q must suit the stored scale
    q = torch.clamp(torch.round(w / scale.float().unsqueeze(1)) + zero.unsqueeze(1), 0, maxq)
    return QuantizedWeight(
        qweight=pack_rows(q.reshape(k, n).to(torch.int32), spec.bits),
        scales=scale,
        qzeros=pack_columns((zero - 1).to(torch.int32), spec.bits),
    )


def trivial_g_idx(k: int, spec: QuantSpec) -> torch.Tensor:
    """GPTQ's g_idx without act-order: input feature i belongs to group i // group_size."""
    return torch.arange(k, dtype=torch.int32) // (k if spec.group_size < 0 else spec.group_size)


def drop_trivial_g_idx(
    tensors: Iterator[tuple[str, tuple[int, ...], torch.Tensor]], spec: QuantSpec, where: str
) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    """The checkpoint's tensors without its `.g_idx` ones, each checked to be act-order free."""
    for name, shape, part in tensors:
        if not name.endswith(".g_idx"):
            yield name, shape, part
            continue
        if not torch.equal(part.to(torch.int32).cpu(), trivial_g_idx(shape[0], spec)):
            raise ValueError(f"{where}: {name} reorders input features (act-order); kvflock needs desc_act false")


class QuantizedLinear(nn.Module):
    """A column- or row-parallel linear layer with packed int4/int8 weights.

    `group` set makes it row-parallel (input features split across ranks, partial products
    summed); otherwise it is column-parallel (or the whole layer). `triton` runs the Triton
    kernel, else the torch reference (the CPU path). `shards` tells the loader which slice
    of each checkpoint tensor this rank holds.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, spec: QuantSpec, triton: bool,
        group: TPGroup | None = None, shard: Shard | None = None, bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        p = pack_factor(spec.bits)
        self.spec, self.triton, self.group = spec, triton, group
        self.in_features, self.out_features = in_features, out_features
        groups = 1 if spec.group_size < 0 else in_features // spec.group_size
        self.qweight = nn.Parameter(torch.empty(in_features // p, out_features, dtype=torch.int32), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(groups, out_features, dtype=SCALES_DTYPE), requires_grad=False)
        self.qzeros = nn.Parameter(torch.empty(groups, out_features // p, dtype=torch.int32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        self.shards = self._shards(shard, p) if shard is not None else {}

    def _shards(self, shard: Shard, p: int) -> dict[str, Shard]:
        if shard.dim == 0:  # column-parallel: a slice of the output features
            columns = Shard(1, shard.start, shard.stop, shard.full)
            packed = Shard(1, shard.start // p, shard.stop // p, shard.full // p)
            return {"qweight": columns, "scales": columns, "qzeros": packed, "bias": shard}
        shards = {"qweight": Shard(0, shard.start // p, shard.stop // p, shard.full // p)}
        if self.spec.group_size > 0:  # per-channel scales span all input features: every rank keeps them
            g = self.spec.group_size
            shards["scales"] = shards["qzeros"] = Shard(0, shard.start // g, shard.stop // g, shard.full // g)
        return shards

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.qzeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = quant_matmul if self.triton else quant_matmul_ref
        y = matmul(x, self.qweight, self.scales, self.qzeros, self.spec.bits, self.spec.group_size)
        if self.group is not None and self.group.distributed:
            y = self.group.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def fill_random(self, gen: torch.Generator) -> None:
        """Random packed weights whose dequantized values have std 0.02 (as dummy weights do),
        with the zero point in the middle of the range."""
        bits = self.spec.bits
        with torch.no_grad():
            self.qweight.copy_(torch.randint(-2**31, 2**31, self.qweight.shape, generator=gen, dtype=torch.int64,
                                             device=gen.device))
            self.qzeros.copy_(pack_columns(torch.full((self.qzeros.shape[0], self.out_features), 2 ** (bits - 1) - 1,
                                                      dtype=torch.int32, device=self.qzeros.device), bits))
            self.scales.fill_(0.02 * 12**0.5 / 2**bits)  # uniform q over 2**bits values has std 2**bits / sqrt(12)
            if self.bias is not None:
                self.bias.zero_()

    def set_weight(self, weight: QuantizedWeight) -> None:
        with torch.no_grad():
            self.qweight.copy_(weight.qweight)
            self.scales.copy_(weight.scales)
            self.qzeros.copy_(weight.qzeros)

    @classmethod
    def fuse(cls, parts: list["QuantizedLinear"]) -> "QuantizedLinear":
        """One layer whose output is the parts' outputs side by side (e.g. [gate | up]); the
        parts then hold column views of its tensors, so nothing is stored twice."""
        first = parts[0]
        with torch.device("meta"):  # its tensors are set below
            fused = cls(first.in_features, sum(p.out_features for p in parts), False, first.spec, first.triton)
        for name in ("qweight", "scales", "qzeros"):
            whole = torch.cat([getattr(p, name).data for p in parts], dim=1)
            setattr(fused, name, nn.Parameter(whole, requires_grad=False))
            start = 0
            for part in parts:
                width = getattr(part, name).shape[1]
                getattr(part, name).data = whole[:, start : start + width]
                start += width
        return fused


# The layer types that replace_linears puts in place of the projections.
QUANTIZED_LINEARS = (QuantizedLinear, Fp8Linear)


def replace_linears(
    model: nn.Module, spec: QuantSpec, triton: bool, quantize: bool = False,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Swap each decoder layer's projections for QuantizedLinear (Fp8Linear for fp8) layers of
    the same shard.

    With `quantize`, the new layers hold the old ones' weights quantized (round-to-nearest);
    otherwise they are empty, to be loaded (build it on the meta device).
    """
    for i in model.model.stage:
        layer = model.model.layers[i]
        for path in QUANTIZED_PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, name)
            new = _quantized_like(old, spec, triton, f"model.layers.{i}.{path}")
            if quantize:
                new.set_weight(old.weight if spec.fp8 else quantize_rtn(old.weight, spec))
                if old.bias is not None:
                    with torch.no_grad():
                        new.bias.copy_(old.bias)
            setattr(parent, name, new)
        if progress is not None:
            progress(f"quantized layer {i + 1}/{len(model.model.layers)} to {spec.label}")


def _quantized_like(old: nn.Module, spec: QuantSpec, triton: bool, name: str) -> QuantizedLinear | Fp8Linear:
    out_features, in_features = old.weight.shape
    row = isinstance(old, RowParallelLinear)
    assert row or isinstance(old, ColumnParallelLinear), name
    if spec.fp8:
        with torch.device(old.weight.device):
            return Fp8Linear(in_features, out_features, old.bias is not None, old.group if row else None,
                             old.shards["weight"], old.weight.dtype)
    p = pack_factor(spec.bits)
    group = in_features if spec.group_size < 0 else spec.group_size
    if in_features % group or in_features % p or out_features % p:
        raise ValueError(
            f"quantization: {name} has {in_features} input and {out_features} output features (this rank's "
            f"share), which int{spec.bits} in groups of {group} cannot pack: input features must be a multiple "
            f"of the group size, both of {p}; try int8, another group size (`kvflock quantize --group-size`) or "
            f"another tensor_parallel_size"
        )
    device = old.weight.device
    with torch.device(device):
        return QuantizedLinear(in_features, out_features, old.bias is not None, spec, triton,
                               old.group if row else None, old.shards["weight"], old.weight.dtype)

