"""Quantization of the decoder's linear layers: weight-only int8 with one scale per output
column, int4 with a scale and zero point per group of input features (from GPTQ or AWQ
checkpoints, or round-to-nearest), and FP8 e4m3 W8A8 (kvflock.worker.model.fp8, which documents
its checkpoint formats).

A QuantizedLinear is built holding its checkpoint's packed tensors (GPTQ's or AWQ's layout,
kvflock.worker.model.quant_formats documents both), so that the loader reads each rank's slice
of them as they are; `repack` then decodes them and packs them once into the kernels' layout
(kvflock.kernels.quant_matmul). Weights quantized here (`quantization: int8|int4` at load, or
random dummy weights for benchmarks) go straight to that layout. The embedding, the norms and
the LM head stay in the model's dtype.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from kvflock.kernels.quant_matmul import group_of, pack_factor, quant_matmul, quant_matmul_ref, unpack_codes
from kvflock.worker.model.fp8 import Fp8Linear, read_fp8_config
from kvflock.worker.model.parallel import ColumnParallelLinear, RowParallelLinear, Shard, TPGroup
from kvflock.worker.model.quant_formats import Codes, awq_decode, gptq_decode, trivial_g_idx

# The projections that are quantized, by their name in a decoder layer.
QUANTIZED_PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
SCALES_DTYPE = torch.float16  # what GPTQ and AWQ checkpoints store, and what we keep (more precise than bf16)


@dataclass(frozen=True)
class QuantSpec:
    """How one model's linear weights are quantized."""

    bits: int
    group_size: int  # input features per scale; -1: one group over all of them (per channel)
    fp8: bool = False  # e4m3 weights and activations (Fp8Linear) rather than packed integers
    method: Literal["gptq", "awq"] = "gptq"  # the checkpoint layout its packed tensors come in
    sym: bool = False  # zero point fixed at 2**(bits - 1) (what `kvflock quantize` writes)

    @property
    def label(self) -> str:
        if self.fp8:
            return "fp8 e4m3 (per channel, dynamic per-token activations)"
        groups = "per channel" if self.group_size < 0 else f"groups of {self.group_size}"
        return f"int{self.bits} ({groups}{', AWQ' if self.method == 'awq' else ''})"


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
    key = f"{where}: quantization_config"
    if method in ("fp8", "compressed-tensors"):
        layers = [f"model.layers.{i}.{p}" for i in range(hf_config.get("num_hidden_layers", 0))
                  for p in QUANTIZED_PROJECTIONS]
        read_fp8_config(qc, layers, where)
        return FP8_SPEC
    if method not in ("gptq", "awq"):
        raise ValueError(f"{key}.quant_method {method!r} is not supported; kvflock runs 'gptq', 'awq', 'fp8' "
                         "and 'compressed-tensors' (float-quantized)")
    bits, group_size = qc.get("bits"), qc.get("group_size", 128)
    allowed_bits = (4, 8) if method == "gptq" else (4,)
    if bits not in allowed_bits:
        choices = " or ".join(map(str, allowed_bits))
        raise ValueError(f"{key}.bits {bits!r} is not supported for {method}; use {choices}")
    if not isinstance(group_size, int) or (group_size != -1 and (group_size < 16 or group_size & (group_size - 1))):
        raise ValueError(f"{key}.group_size {group_size!r} must be -1 or a power of two >= 16")
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"{key}.version {qc['version']!r} is not supported; kvflock reads AWQ's 'gemm' "
                             "packing (qweight [in, out / 8])")
        if not qc.get("zero_point", True):
            raise ValueError(f"{key}.zero_point is false; kvflock reads AWQ checkpoints with zero points")
        for entry in qc.get("modules_to_not_convert") or []:
            if any(entry in p for p in QUANTIZED_PROJECTIONS):
                raise ValueError(f"{key}.modules_to_not_convert holds {entry!r}, which leaves decoder projections "
                                 "unquantized; kvflock quantizes all of them")
        return QuantSpec(4, group_size, method="awq")
    if qc.get("desc_act"):
        raise ValueError(f"{key}.desc_act is true (act-order); kvflock needs desc_act false")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{key}.checkpoint_format {qc['checkpoint_format']!r} is not "
                         "supported; kvflock reads 'gptq' (v1: qzeros store zero - 1)")
    return QuantSpec(bits, group_size, sym=bool(qc.get("sym", False)))


def gptq_config(spec: QuantSpec) -> dict[str, Any]:
    """The `quantization_config` that describes checkpoints written by `kvflock quantize`
    (docs/quantization.md says why vLLM accepts each field)."""
    return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": False,
            "sym": spec.sym, "checkpoint_format": "gptq", "lm_head": False}


def group_parameters(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales (float16) and zero points (int32) [G, n] of weights grouped as
    w [G, group, n].

    Asymmetric: [min, max] (widened to hold 0) maps onto [0, 2**bits - 1]; zero point 0 is
    avoided because GPTQ v1 cannot store it, so a group without negative values maps [0, max]
    onto [1, maxq]. Symmetric: [-amax, amax] onto codes around 2**(bits-1), the largest
    magnitude at -2**(bits-1) (GPTQ's convention: scale = 2 amax / maxq)."""
    maxq = 2**spec.bits - 1
    if spec.sym:
        scale = 2 * w.abs().amax(1) / maxq
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        low, high = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = (high - low) / maxq
        zero = torch.round(-low / torch.where(scale > 0, scale, 1))
        no_negatives = zero < 1
        scale = torch.where(no_negatives, high / (maxq - 1), scale)
        zero = torch.where(no_negatives, 1, zero)
    # rounded before use: the codes must suit the scale as stored
    return torch.where(scale > 0, scale, 1).to(SCALES_DTYPE), zero.to(torch.int32)


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> Codes:
    """Round-to-nearest per group (`group_parameters`). `weight` is [n, k] (out, in)."""
    n, k = weight.shape
    group = group_of(spec.group_size, k)
    if k % group:
        raise ValueError(f"weight: {k} input features are not a multiple of the group size {group}")
    w = weight.detach().float().t().reshape(k // group, group, n)
    scale, zero = group_parameters(w, spec)
    q = torch.clamp(torch.round(w / scale.float().unsqueeze(1)) + zero.unsqueeze(1), 0, 2**spec.bits - 1)
    return Codes(q.reshape(k, n).to(torch.int32), zero, scale, spec.bits, spec.group_size)


def drop_trivial_g_idx(
    tensors: Iterator[tuple[str, tuple[int, ...], torch.Tensor]], spec: QuantSpec, where: str
) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    """The checkpoint's tensors without its `.g_idx` ones, each checked to be act-order free."""
    for name, shape, part in tensors:
        if not name.endswith(".g_idx"):
            yield name, shape, part
            continue
        if not torch.equal(part.to(torch.int32).cpu(), trivial_g_idx(shape[0], spec.group_size)):
            raise ValueError(f"{where}: {name} reorders input features (act-order); kvflock needs desc_act false")


class QuantizedLinear(nn.Module):
    """A column- or row-parallel linear layer with packed int4/int8 weights.

    `group` set makes it row-parallel (input features split across ranks, partial products
    summed); otherwise it is column-parallel (or the whole layer). `triton` runs the Triton
    kernels, else the torch reference (the CPU path). Until `repack` (or `set_codes`) it holds
    the checkpoint's `qweight`, `qzeros` and `scales` in `spec.method`'s layout, and `shards`
    tells the loader which slice of each this rank holds; after, `words`, `scales`, `zeros` in
    the kernels' layout.
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
        qweight = (in_features, out_features // p) if spec.method == "awq" else (in_features // p, out_features)
        self.qweight = nn.Parameter(torch.empty(qweight, dtype=torch.int32), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(groups, out_features, dtype=SCALES_DTYPE), requires_grad=False)
        self.qzeros = nn.Parameter(torch.empty(groups, out_features // p, dtype=torch.int32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        self.shards = self._shards(shard, p) if shard is not None else {}

    def _shards(self, shard: Shard, p: int) -> dict[str, Shard]:
        awq = self.spec.method == "awq"
        if shard.dim == 0:  # column-parallel: a slice of the output features
            columns = Shard(1, shard.start, shard.stop, shard.full)
            packed = Shard(1, shard.start // p, shard.stop // p, shard.full // p)
            return {"qweight": packed if awq else columns, "scales": columns, "qzeros": packed, "bias": shard}
        rows = Shard(0, shard.start, shard.stop, shard.full)
        shards = {"qweight": rows if awq else Shard(0, shard.start // p, shard.stop // p, shard.full // p)}
        if self.spec.group_size > 0:  # per-channel scales span all input features: every rank keeps them
            g = self.spec.group_size
            shards["scales"] = shards["qzeros"] = Shard(0, shard.start // g, shard.stop // g, shard.full // g)
        return shards

    def repack(self) -> None:
        """Decode the loaded checkpoint tensors and keep them in the kernels' layout."""
        if self.spec.method == "awq":
            codes = awq_decode(self.qweight, self.qzeros, self.scales, self.spec.group_size)
        else:
            codes = gptq_decode(self.qweight, self.qzeros, self.scales, self.spec.bits, self.spec.group_size)
        self.set_codes(codes)

    def set_codes(self, codes: Codes) -> None:
        packed = codes.pack()
        for name in ("qweight", "qzeros"):
            if hasattr(self, name):
                delattr(self, name)
        self.shards = {}
        self.words = nn.Parameter(packed.words, requires_grad=False)
        self.scales = nn.Parameter(packed.scales.to(SCALES_DTYPE), requires_grad=False)
        self.zeros = nn.Parameter(packed.zeros, requires_grad=False)

    def codes(self) -> Codes:
        """The weight as codes, zero points and scales (once packed)."""
        return Codes(unpack_codes(self.words, self.spec.bits), self.zeros.to(torch.int32), self.scales,
                     self.spec.bits, self.spec.group_size)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [n, k] (out, in), as torch's linear layers hold it."""
        return self.codes().dequantize().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = quant_matmul if self.triton else quant_matmul_ref
        y = matmul(x, self.words, self.scales, self.zeros, self.spec.bits, self.spec.group_size)
        if self.group is not None and self.group.distributed:
            y = self.group.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def fill_random(self, gen: torch.Generator) -> None:
        """Random codes whose dequantized values have std 0.02 (as dummy weights do), with the
        zero point in the middle of the range."""
        bits, k, n = self.spec.bits, self.in_features, self.out_features
        device = self.scales.device
        groups = k // group_of(self.spec.group_size, k)
        q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32, device=gen.device).to(device)
        zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32, device=device)
        # uniform codes over 2**bits values have std 2**bits / sqrt(12)
        scales = torch.full((groups, n), 0.02 * 12**0.5 / 2**bits, dtype=SCALES_DTYPE, device=device)
        self.set_codes(Codes(q, zeros, scales, bits, self.spec.group_size))
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    @classmethod
    def fuse(cls, parts: list["QuantizedLinear"]) -> "QuantizedLinear":
        """One layer whose output is the parts' outputs side by side (e.g. [gate | up]); the
        parts then hold column views of its tensors, so nothing is stored twice."""
        first = parts[0]
        with torch.device("meta"):  # its tensors are set below
            fused = cls(first.in_features, sum(p.out_features for p in parts), False, first.spec, first.triton)
        del fused.qweight, fused.qzeros
        for name in ("words", "scales", "zeros"):
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
                if spec.fp8:
                    new.set_weight(old.weight)
                else:
                    new.set_codes(quantize_rtn(old.weight, spec))
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
    if in_features % group or in_features % 16 or out_features % p:
        raise ValueError(
            f"quantization: {name} has {in_features} input and {out_features} output features (this rank's "
            f"share), which int{spec.bits} in groups of {group} cannot pack: input features must be a multiple "
            f"of the group size and of 16, output features of {p}; try int8, another group size (`kvflock "
            f"quantize --group-size`) or another tensor_parallel_size"
        )
    device = old.weight.device
    with torch.device(device):
        return QuantizedLinear(in_features, out_features, old.bias is not None, spec, triton,
                               old.group if row else None, old.shards["weight"], old.weight.dtype)

