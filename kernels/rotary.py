"""Rotary position embedding, neox style (rotate halves): the cos/sin cache, the torch
reference and its Triton kernel.

The cache row of position p is `[cos(p * f) | sin(p * f)]` over the head_dim / 2 frequencies f;
frequency scaling (Llama 3's) is baked into the cache, so one kernel serves every model.
"""

import math
from dataclasses import dataclass

import torch

from kvflock.kernels._triton import jit, tl


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's `rope_scaling` (rope_type "llama3"): long wavelengths are slowed by `factor`,
    short ones kept, and the band between is interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: Llama3RopeScaling) -> torch.Tensor:
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = scaling.original_max_positions / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_positions / scaling.high_freq_factor
    smooth = (scaling.original_max_positions / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


def rope_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    theta: float,
    llama3: Llama3RopeScaling | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[max_positions, head_dim] float32 rows `[cos | sin]`. Angles are computed in float64:
    in float32 they drift by ~1e-3 rad at position 32k."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if llama3 is not None:
        inv_freq = _llama3_inv_freq(inv_freq, llama3)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(device)


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [t, hq, d] and k [t, hkv, d] to their tokens' `positions` [t]; computed in
    float32, rounded once. Returns new (q, k)."""
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@jit
def _rotate_heads(x_ptr, out_ptr, tok, cos, sin, num_heads, stride_tok, stride_head,
                  BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """All heads of one token of x: [BLOCK_H, HALF] halves, rotated, into contiguous out."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    src = x_ptr + tok * stride_tok + heads * stride_head + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + (tok * num_heads + heads) * (2 * HALF) + dims
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cache_ptr, q_out_ptr, k_out_ptr, num_q_heads, num_k_heads,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cache,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr,
):
    """One token: its cos/sin row is read once for all its q and k heads."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok)
    half = tl.arange(0, HALF)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + half)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + half)
    _rotate_heads(q_ptr, q_out_ptr, tok, cos, sin, num_q_heads, stride_q_tok, stride_q_head, BLOCK_HQ, HALF)
    _rotate_heads(k_ptr, k_out_ptr, tok, cos, sin, num_k_heads, stride_k_tok, stride_k_head, BLOCK_HK, HALF)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rotary_ref`. q and k may be strided views (slices of a fused QKV
    output) with a contiguous head_dim; the outputs are new contiguous tensors."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if cos_sin_cache.shape[-1] != head_dim or head_dim & (head_dim - 1):
        raise ValueError(
            f"rotary: head_dim {head_dim} must be a power of two and match the cos/sin cache's "
            f"last axis {cos_sin_cache.shape[-1]} (partial rotary is not supported)"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary: q, k and cos_sin_cache need a contiguous last axis")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache, q_out, k_out, num_q_heads, num_k_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        BLOCK_HQ=1 << max(num_q_heads - 1, 0).bit_length(),
        BLOCK_HK=1 << max(num_k_heads - 1, 0).bit_length(),
        HALF=head_dim // 2, num_warps=4,
    )
    return q_out, k_out
