"""Matmul with weight-only quantized weights (int4 or int8, a scale and a zero point per group of
input features) in a layout built for the kernels: the torch reference, which dequantizes and
multiplies, a Triton GEMV for batches of 1-4 rows and a Triton GEMM above.

A linear layer `y = x W^T` with W of shape [n, k] (out, in) is held as codes q[i, j] in
[0, 2**bits) of W^T [k, n], with W^T[i, j] = (q[i, j] - zero[g, j]) * scale[g, j], g = i // group.
Checkpoint formats (GPTQ, AWQ) are decoded into these codes by kvflock.worker.model.quant_formats
and packed once at load (`pack_weight`):

- `words`  int32 [k / T, n, T / P]: k is cut into tiles of T input features (T = `tile_size`,
  at most 128 and never more than a group, so a tile has one scale per column); P = 32 // bits
  codes share an int32. Tile t of column j is T / P consecutive int32, and the tiles of all
  columns are consecutive: a kernel reading a [columns, tile] block reads one contiguous span,
  every thread a wide aligned load.
- inside a tile the codes are interleaved: code b (bits b*bits .. b*bits + bits - 1) of word w
  is input feature t*T + b*(T/P) + w. One shift and one mask of a whole [columns, T/P] block of
  words then yields the codes of T/P consecutive input features, which the GEMV multiplies with
  a contiguous slice of x (no register shuffles); the GEMM unpacks all codes of a word side by
  side and reads x in the same interleaved order instead.
- `scales` [G, n] (float16, as checkpoints store them) and `zeros` uint8 [G, n], unpacked, so a
  block of columns loads its group's scales and zero points as two contiguous vectors.

The GEMV works in float32 throughout and multiplies each tile's scale in after summing over the
tile; the reference and the GEMM round each dequantized weight to the activation's dtype and
accumulate in float32. The results differ by that rounding and the summation order only.
"""

from dataclasses import dataclass
from typing import Any

import torch

from kvflock.kernels._triton import jit, tl

SUPPORTED_BITS = (4, 8)
MAX_TILE = 128
GEMV_MAX_ROWS = 4  # batches up to this many rows take the GEMV path


def pack_factor(bits: int) -> int:
    """Codes per int32."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: {bits} is not supported; use one of {SUPPORTED_BITS}")
    return 32 // bits


def group_of(group_size: int, k: int) -> int:
    """Input features per scale: `group_size` -1 means one group over all k (per channel)."""
    return k if group_size <= 0 else group_size


def tile_size(k: int, group: int) -> int:
    """Input features per tile: the largest power of two <= 128 dividing both k and the group."""
    lowest = (k & -k) if k > 0 else MAX_TILE
    return min(MAX_TILE, lowest, group & -group)


def check_shape(k: int, n: int, bits: int, group_size: int) -> None:
    """Raise ValueError unless a [n, k] weight fits the layout at this bits and group size."""
    p = pack_factor(bits)
    group = group_of(group_size, k)
    if group != k and (group < 16 or group & (group - 1) or k % group):
        raise ValueError(f"group_size: {group_size} must be -1 or a power of two >= 16 that divides k={k}")
    if k % 16 or n % p:
        raise ValueError(f"quantized weight: k={k} must be a multiple of 16 and n={n} of {p} at {bits} bits")


@dataclass
class PackedWeight:
    """One linear layer's weight in the layout above."""

    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int  # -1: per channel

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.words, self.scales, self.zeros, self.bits, self.group_size)


def pack_weight(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> PackedWeight:
    """Pack codes [k, n] (ints in [0, 2**bits)), zero points [G, n] and scales [G, n]."""
    k, n = codes.shape
    check_shape(k, n, bits, group_size)
    group = group_of(group_size, k)
    if tuple(zeros.shape) != (k // group, n) or tuple(scales.shape) != (k // group, n):
        raise ValueError(f"quantized weight: zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} do not "
                         f"fit k={k}, n={n}, group_size={group_size} (expected {(k // group, n)})")
    p, tile = pack_factor(bits), tile_size(k, group)
    # [k, n] -> [tile index, code b, word w, column] -> [tile index, column, word w, code b]
    q = codes.to(torch.int64).view(k // tile, p, tile // p, n).permute(0, 3, 2, 1)
    shifts = torch.arange(p, device=codes.device) * bits
    words = (q << shifts).sum(-1)  # the fields do not overlap, so the sum is their bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return PackedWeight(words.contiguous(), scales.contiguous(), zeros.to(torch.uint8).contiguous(), bits, group_size)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_weight` for the codes: int32 [k, n]."""
    tiles, n, width = words.shape
    p = pack_factor(bits)
    shifts = torch.arange(p, device=words.device, dtype=torch.int32) * bits
    q = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [tile, column, word, code]
    return q.permute(0, 3, 2, 1).reshape(tiles * width * p, n)


def dequantize(
    words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """W^T as float32 [k, n]."""
    q = unpack_codes(words, bits)
    group = group_of(group_size, q.shape[0])
    return (q - zeros.to(torch.int32).repeat_interleave(group, 0)).float() * scales.float().repeat_interleave(group, 0)


def quant_matmul_ref(
    x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """x [..., k] times the dequantized weights: [..., n], in x's dtype."""
    return torch.matmul(x, dequantize(words, scales, zeros, bits, group_size).to(x.dtype))


# 2**23 as a float: its low mantissa bits are free, so a code q OR-ed into them reads as 2**23 + q
# (one integer OR and a reinterpretation, where a conversion instruction would cost more).
MAGIC: tl.constexpr = 8388608.0


@jit
def _codes_as_float(q):
    """Codes (int32 in [0, 2**23)) as float32 values 2**23 + q, exactly."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@jit
def _gemv_kernel(
    x_ptr, words_ptr, scales_ptr, zeros_ptr, out_ptr,
    m, n, num_tiles, tiles_per_split, tiles_per_group,
    stride_x, stride_tile, stride_col, stride_scales, stride_zeros, stride_out, stride_split,
    BITS: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A [BLOCK_M, BLOCK_N] output block over split `program_id(1)`'s tiles of k, on CUDA cores.

    Each tile is one contiguous [BLOCK_N, TILE / P] block of words; code b of every word is the
    input features b * TILE / P + [0, TILE / P), multiplied with that contiguous slice of x.
    Products are summed per word position across the tile's codes, scaled once per tile, and
    reduced across word positions only at the end.
    """
    PACK: tl.constexpr = 32 // BITS
    WIDTH: tl.constexpr = TILE // PACK
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_n, pid_split = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, WIDTH)
    mask_n, mask_m = offs_n < n, offs_m < m
    acc = tl.zeros((BLOCK_M, BLOCK_N, WIDTH), dtype=tl.float32)
    start = pid_split * tiles_per_split
    for t in range(start, tl.minimum(start + tiles_per_split, num_tiles)):
        words = tl.load(words_ptr + t * stride_tile + offs_n[:, None] * stride_col + offs_w[None, :],
                        mask=mask_n[:, None], other=0)
        g = t // tiles_per_group
        scale = tl.load(scales_ptr + g * stride_scales + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * stride_zeros + offs_n, mask=mask_n, other=0).to(tl.float32) + MAGIC
        part = tl.zeros((BLOCK_M, BLOCK_N, WIDTH), dtype=tl.float32)
        for b in tl.static_range(PACK):
            w = _codes_as_float((words >> (b * BITS)) & MAXQ) - zero[:, None]
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + (t * TILE + b * WIDTH + offs_w)[None, :],
                        mask=mask_m[:, None], other=0.0).to(tl.float32)
            part += w[None, :, :] * x[:, None, :]
        acc += part * scale[None, :, None]
    out = out_ptr + pid_split * stride_split + offs_m[:, None] * stride_out + offs_n[None, :]
    tl.store(out, tl.sum(acc, axis=2).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@jit
def _gemm_kernel(
    x_ptr, words_ptr, scales_ptr, zeros_ptr, out_ptr,
    m, n, num_tiles, tiles_per_split, tiles_per_group,
    stride_x, stride_tile, stride_col, stride_scales, stride_zeros, stride_out, stride_split,
    BITS: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """A [BLOCK_M, BLOCK_N] output block over split `program_id(2)`'s tiles of k, on tensor cores.

    The codes of each word are unpacked side by side (position c = word * P + code), which is
    input feature code * TILE / P + word: x is read in that order, so the weight tile needs no
    reordering before the dot.
    """
    PACK: tl.constexpr = 32 // BITS
    WIDTH: tl.constexpr = TILE // PACK
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_n, pid_m, pid_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < n, offs_m < m
    offs_w = tl.arange(0, WIDTH)
    shifts = tl.arange(0, PACK) * BITS
    c = tl.arange(0, TILE)
    feature = (c % PACK) * WIDTH + c // PACK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = pid_split * tiles_per_split
    for t in range(start, tl.minimum(start + tiles_per_split, num_tiles)):
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + (t * TILE + feature)[None, :], mask=mask_m[:, None], other=0.0)
        words = tl.load(words_ptr + t * stride_tile + offs_n[:, None] * stride_col + offs_w[None, :],
                        mask=mask_n[:, None], other=0)
        q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & MAXQ, (BLOCK_N, TILE))
        g = t // tiles_per_group
        scale = tl.load(scales_ptr + g * stride_scales + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * stride_zeros + offs_n, mask=mask_n, other=0).to(tl.float32) + MAGIC
        w = ((_codes_as_float(q) - zero[:, None]) * scale[:, None]).to(x_ptr.dtype.element_ty)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    out = out_ptr + pid_split * stride_split + offs_m[:, None] * stride_out + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# Launch settings by batch rows (the first entry whose bound holds). Fixed rather than tuned by
# Triton's autotuner at first use, which would stall a restarting worker and cannot run inside
# CUDA graph capture; bench/quant.py --sweep times alternatives on the device.
#   rows <=, BLOCK_M, BLOCK_N, num_warps, num_stages
CONFIGS = (
    (1, 1, 64, 4, 4),
    (2, 2, 64, 4, 4),
    (GEMV_MAX_ROWS, 4, 64, 4, 4),
    (16, 16, 64, 4, 4),
    (32, 32, 64, 4, 4),
    (64, 64, 64, 4, 3),
    (256, 64, 128, 8, 3),
    (1 << 62, 128, 128, 8, 3),  # prefill: taller blocks spread each dequantized tile over more rows
)
# Split k until the launch has this many programs per SM (decode reads each weight once per
# step: the goal is enough loads in flight to keep HBM busy), keeping >= 2 tiles per split and
# the float32 partial sums (split x m x n) under a quarter of the weight's bytes.
PROGRAMS_PER_SM = 4


def launch_config(m: int, n: int, k: int, tile: int, bits: int, device: torch.device) -> dict[str, Any]:
    """Block sizes, warps, pipeline stages and the k split for one call."""
    _, block_m, block_n, warps, stages = next(c for c in CONFIGS if m <= c[0])
    if m <= GEMV_MAX_ROWS:  # the same bytes of words per block at either width (and half the registers at 8 bits)
        block_n = block_n * 4 // bits
    blocks = -(-n // block_n) * -(-m // block_m)
    tiles, split = k // tile, 1
    max_split = k * bits // (128 * m)  # partial sums: 4 bytes x split x m x n <= k x n x bits / 8 / 4
    while (blocks * split < PROGRAMS_PER_SM * _num_sms(device) and tiles // (2 * split) >= 2
           and 2 * split <= max_split):
        split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split, "num_warps": warps,
            "num_stages": stages if device.type == "cuda" else 1}


def quant_matmul(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    split_k: int | None = None,
) -> torch.Tensor:
    """Triton version of `quant_matmul_ref`. The packed tensors may be column slices of wider
    ones (a fused projection's parts): only their innermost axis must be contiguous.
    `split_k` overrides the configured k split (for tests and tuning)."""
    k, n = x.shape[-1], words.shape[1]
    p = pack_factor(bits)
    check_shape(k, n, bits, group_size)
    group = group_of(group_size, k)
    tile = tile_size(k, group)
    if tuple(words.shape) != (k // tile, n, tile // p) or tuple(scales.shape) != (k // group, n) \
            or tuple(zeros.shape) != (k // group, n):
        raise ValueError(f"quantized weight: words {tuple(words.shape)}, scales {tuple(scales.shape)}, zeros "
                         f"{tuple(zeros.shape)} do not fit k={k}, n={n}, bits={bits}, group_size={group_size}")
    if words.stride(2) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1:
        raise ValueError("quantized weight: words, scales and zeros need a contiguous innermost axis")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    cfg = launch_config(m, n, k, tile, bits, x.device)
    tiles = k // tile
    split = min(split_k or cfg["SPLIT_K"], tiles)
    per_split = -(-tiles // split)
    split = -(-tiles // per_split)
    out = torch.empty((split, m, n), dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    args = (rows, words, scales, zeros, out, m, n, tiles, per_split, group // tile,
            rows.stride(0), words.stride(0), words.stride(1), scales.stride(0), zeros.stride(0),
            out.stride(1), out.stride(0))
    meta = {"BITS": bits, "TILE": tile, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if m <= GEMV_MAX_ROWS:
        _gemv_kernel[(-(-n // cfg["BLOCK_N"]), split)](*args, **meta)
    else:
        grid = (-(-n // cfg["BLOCK_N"]), -(-m // cfg["BLOCK_M"]), split)
        _gemm_kernel[grid](*args, **meta, IEEE=x.dtype == torch.float32)
    result = out[0] if split == 1 else out.sum(0).to(x.dtype)
    return result.view(*x.shape[:-1], n)
