"""Matmul with weight-only quantized weights (int4 or int8, GPTQ packing): the torch reference,
which dequantizes and multiplies, and a Triton kernel that dequantizes in registers.

Layout (GPTQ "v1", what AutoGPTQ and most published GPTQ checkpoints store; act-order off).
A linear layer `y = x W^T` with W of shape [n, k] (out, in) is stored transposed and packed,
with P = 32 // bits values per int32 and G = k // group_size groups along k:

- `qweight` int32 [k / P, n]: q[i, j] sits in qweight[i // P, j] at bits (i % P) * bits.
- `qzeros`  int32 [G, n / P]: the zero point of (group g, column j), minus one, sits in
  qzeros[g, j // P] at bits (j % P) * bits. GPTQ v1 stores `zero - 1` (a historic off-by-one
  that its kernels undo); we keep the stored bits as they are and add the one back here.
- `scales`  float [G, n] (float16 in checkpoints).
- W^T[i, j] = (q[i, j] - zero[i // group_size, j]) * scales[i // group_size, j].

int8 per channel is the same layout with group_size = k (G = 1: one scale per output column).
Both paths compute a weight tile as `(q - zero) * scale` in float32, round it to the
activation's dtype and multiply with float32 accumulation, so they differ only in summation
order.
"""

from typing import Any

import torch

from kvflock.kernels._triton import jit, tl

SUPPORTED_BITS = (4, 8)


def pack_factor(bits: int) -> int:
    """Values per int32."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: {bits} is not supported; use one of {SUPPORTED_BITS}")
    return 32 // bits


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2**bits) of shape [r, c] packed along r: int32 [r / P, c]."""
    p = pack_factor(bits)
    r, c = values.shape
    v = values.to(torch.int64).view(r // p, p, c)
    shifts = (torch.arange(p, device=values.device) * bits).view(1, p, 1)
    packed = (v << shifts).sum(1)  # the fields do not overlap, so the sum is their bitwise or
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [r / P, c] -> int32 [r, c]."""
    p = pack_factor(bits)
    shifts = (torch.arange(p, device=packed.device, dtype=torch.int32) * bits).view(1, p, 1)
    return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, packed.shape[1])


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers of shape [r, c] packed along c: int32 [r, c / P]."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_columns`."""
    return unpack_rows(packed.t(), bits).t()


def _group(group_size: int, k: int) -> int:
    return k if group_size <= 0 else group_size


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """W^T as float32 [k, n]. `group_size` -1 (or k) means one group: per-channel scales."""
    q = unpack_rows(qweight, bits)
    group = _group(group_size, q.shape[0])
    zeros = unpack_columns(qzeros, bits) + 1  # GPTQ v1 stores zero - 1
    return (q - zeros.repeat_interleave(group, 0)).float() * scales.float().repeat_interleave(group, 0)


def quant_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """x [..., k] times the dequantized weights: [..., n], in x's dtype."""
    return torch.matmul(x, dequantize(qweight, scales, qzeros, bits, group_size).to(x.dtype))


@jit
def _quant_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr,
    m, n, k, k_per_split, group_size,
    stride_x, stride_qweight, stride_scales, stride_qzeros, stride_out, stride_split,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over the k range of split `program_id(2)`.

    Each step loads BLOCK_K / P packed rows once (one int32 per P weights), unpacks them with
    shifts into a [BLOCK_K, BLOCK_N] tile, applies that tile's group's zero and scale (a block
    never straddles two groups) and feeds tensor cores at the activation's dtype.
    """
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_n, pid_m, pid_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < m, offs_n < n
    shifts = tl.arange(0, PACK) * BITS
    zero_shifts = (offs_n % PACK) * BITS
    packed_rows = tl.arange(0, BLOCK_K // PACK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, k)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k < k)[None, :], other=0.0,
        )
        rows = k0 // PACK + packed_rows
        packed = tl.load(
            qweight_ptr + rows[:, None].to(tl.int64) * stride_qweight + offs_n[None, :],
            mask=(rows < k // PACK)[:, None] & mask_n[None, :], other=0,
        )
        q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & MAXQ, (BLOCK_K, BLOCK_N))
        g = k0 // group_size
        scale = tl.load(scales_ptr + g * stride_scales + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = ((tl.load(qzeros_ptr + g * stride_qzeros + offs_n // PACK, mask=mask_n, other=0) >> zero_shifts) & MAXQ) + 1
        w = ((q - zero[None, :]).to(tl.float32) * scale[None, :]).to(x_ptr.dtype.element_ty)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    out = out_ptr + pid_split * stride_split + offs_m[:, None] * stride_out + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _config(m: int, n: int, k: int, group: int, device: torch.device) -> dict[str, Any]:
    """Tile sizes and the k split for one call. Chosen by rule rather than by Triton's
    autotuner: tuning at first use would stall a restarting worker and cannot run inside CUDA
    graph capture. Decode (m <= 64) reads every weight once per call, so the rule's goal is
    enough programs in flight to keep HBM busy: narrow n tiles, and splitting k when n alone
    gives too few tiles (bench/quant.py --sweep times alternatives)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    # Wide tiles for the large matrices (gate/up, down): 1.15-1.2x faster there on an H100,
    # 5-10% slower on q/k/v and o (bench/quant.py --sweep, 2026-11-26).
    block_n = 128 if n * k >= 1 << 25 else 64
    block_k = min(128, group) if group < k else 128
    tiles = -(-n // block_n) * -(-m // block_m)
    split = 1
    while tiles * split < 2 * _num_sms(device) and k // (2 * split * block_k) >= 2:
        split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4,
            "num_stages": 3 if device.type == "cuda" else 1}


def check_quantized_shapes(
    k: int, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int
) -> None:
    """Raise ValueError unless the packed tensors describe a [n, k] weight in the layout above."""
    p = pack_factor(bits)
    n = qweight.shape[1]
    group = _group(group_size, k)
    if k % p or n % p:
        raise ValueError(f"quantized weight: k={k} and n={n} must be multiples of {p} at {bits} bits")
    if group != k and (group < 16 or group & (group - 1) or k % group):
        raise ValueError(f"group_size: {group_size} must be -1 or a power of two >= 16 that divides k={k}")
    groups = k // group
    if tuple(qweight.shape) != (k // p, n) or tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // p):
        raise ValueError(
            f"quantized weight: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, qzeros "
            f"{tuple(qzeros.shape)} do not fit k={k}, n={n}, bits={bits}, group_size={group_size}"
        )


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    group_size: int,
    split_k: int | None = None,
) -> torch.Tensor:
    """Triton version of `quant_matmul_ref`. The packed tensors may be column slices of wider
    ones (a fused projection's halves): only their last axis must be contiguous.
    `split_k` overrides the rule's k split (for tests and tuning)."""
    k = x.shape[-1]
    n = qweight.shape[1]
    check_quantized_shapes(k, qweight, scales, qzeros, bits, group_size)
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or qzeros.stride(1) != 1:
        raise ValueError("quantized weight: qweight, scales and qzeros need a contiguous last axis")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    group = _group(group_size, k)
    cfg = _config(m, n, k, group, x.device)
    block_k = cfg["BLOCK_K"]
    split = split_k or cfg["SPLIT_K"]
    k_per_split = -(-(-(-k // split)) // block_k) * block_k
    split = -(-k // k_per_split)
    out = torch.empty((split, m, n), dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    grid = (-(-n // cfg["BLOCK_N"]), -(-m // cfg["BLOCK_M"]), split)
    _quant_matmul_kernel[grid](
        rows, qweight, scales, qzeros, out,
        m, n, k, k_per_split, group,
        rows.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), out.stride(1), out.stride(0),
        BITS=bits, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    result = out[0] if split == 1 else out.sum(0).to(x.dtype)
    return result.view(*x.shape[:-1], n)
