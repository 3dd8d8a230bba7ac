"""The packed tensors of GPTQ and AWQ checkpoints: encode and decode one linear layer's
`qweight`, `qzeros` and `scales` from and to plain codes, zero points and scales (`Codes`),
which kvflock.kernels.quant_matmul packs into the kernels' own layout.

A layer `y = x W^T`, W of shape [n, k] (out, in), with P = 32 // bits codes per int32 and
G = k // group_size groups along k:

GPTQ ("v1", what AutoGPTQ, GPTQModel's default output and `kvflock quantize` write; act-order off):
- `qweight` int32 [k / P, n], packed along k: the code of (input i, output j) sits in
  qweight[i // P, j] at bits (i % P) * bits.
- `qzeros` int32 [G, n / P], packed along n the same way, holding `zero - 1` (a historic
  off-by-one that every v1 reader adds back; a symmetric checkpoint stores 2**(bits-1) - 1).
- `scales` float16 [G, n]; `g_idx` int32 [k] (i // group_size without act-order).

AWQ (AutoAWQ's "gemm" version, `quant_method: awq`, `version: gemm`; 4 bits):
- `qweight` int32 [k, n / 8], packed along n: the 8 codes of outputs 8c .. 8c+7 share
  qweight[i, c], output 8c + AWQ_ORDER[b] at bits 4b (an order its CUDA dequantizer unpacks
  cheaply).
- `qzeros` int32 [G, n / 8], the zero points themselves, packed like qweight.
- `scales` float16 [G, n].

Both give W^T[i, j] = (q[i, j] - zero[i // group_size, j]) * scales[i // group_size, j].
"""

from dataclasses import dataclass

import torch

from kvflock.kernels.quant_matmul import PackedWeight, pack_factor, pack_weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output 8c + AWQ_ORDER[b] sits in code b of word c


@dataclass
class Codes:
    """One layer's quantized weight unpacked: codes [k, n], zero points [G, n], scales [G, n]."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int  # -1: per channel

    def pack(self) -> PackedWeight:
        return pack_weight(self.q, self.zeros, self.scales, self.bits, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """W^T as float32 [k, n]."""
        group = self.q.shape[0] // self.scales.shape[0]
        return ((self.q - self.zeros.repeat_interleave(group, 0)).float()
                * self.scales.float().repeat_interleave(group, 0))


def _pack(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Integers [r, c] in [0, 2**bits) packed along c: int32 [r, c / P], value c*P + order[b]
    at bits b*bits of word c (order: identity by default)."""
    p = pack_factor(bits)
    r, c = values.shape
    v = values.to(torch.int64).view(r, c // p, p)
    if order is not None:
        v = v[:, :, list(order)]
    packed = (v << (torch.arange(p, device=values.device) * bits)).sum(-1)  # disjoint fields: sum == or
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `_pack`: int32 [r, c / P] -> int32 [r, c]."""
    p = pack_factor(bits)
    shifts = torch.arange(p, device=packed.device, dtype=torch.int32) * bits
    v = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        v = v[:, :, [order.index(b) for b in range(p)]]
    return v.reshape(packed.shape[0], -1)


def gptq_encode(codes: Codes) -> dict[str, torch.Tensor]:
    """`qweight`, `qzeros` and `scales` of a GPTQ v1 checkpoint (g_idx: `trivial_g_idx`)."""
    if (codes.zeros < 1).any():
        raise ValueError("GPTQ v1 stores zero - 1, so a zero point of 0 cannot be written")
    return {"qweight": _pack(codes.q.t(), codes.bits).t().contiguous(),
            "qzeros": _pack(codes.zeros - 1, codes.bits), "scales": codes.scales}


def gptq_decode(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                group_size: int) -> Codes:
    return Codes(_unpack(qweight.t(), bits).t(), _unpack(qzeros, bits) + 1, scales, bits, group_size)


def trivial_g_idx(k: int, group_size: int) -> torch.Tensor:
    """GPTQ's g_idx without act-order: input feature i belongs to group i // group_size."""
    return torch.arange(k, dtype=torch.int32) // (k if group_size < 0 else group_size)


def awq_encode(codes: Codes) -> dict[str, torch.Tensor]:
    """`qweight`, `qzeros` and `scales` of an AWQ (gemm) checkpoint."""
    return {"qweight": _pack(codes.q, 4, AWQ_ORDER), "qzeros": _pack(codes.zeros, 4, AWQ_ORDER),
            "scales": codes.scales}


def awq_decode(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Codes:
    return Codes(_unpack(qweight, 4, AWQ_ORDER), _unpack(qzeros, 4, AWQ_ORDER), scales, 4, group_size)
