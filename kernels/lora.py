"""Grouped low-rank matmuls for serving many LoRA adapters in one batch: `lora_shrink`
(y = x A_s^T) and `lora_expand` (out += y B_s^T), each token with the adapter slot s of its
sequence. The torch references and the Triton kernels share their signatures.

A step's tokens are grouped by slot: `order` lists the token rows of slot 0, then slot 1, ...,
and `seg_starts[s]:seg_starts[s + 1]` is slot s's part of it (`seg_starts` has num_slots + 1
entries; rows of tokens without an adapter appear nowhere, and entries of `order` from
`seg_starts[-1]` on are never read). Grouping lets one program multiply a tile of tokens by one
adapter's matrices with `tl.dot`, so each adapter's weights are read once per tile whether the
batch holds one adapter or sixty-four. The grid is sized from the tensors' shapes alone
(num_slots x token tiles x output tiles; programs beyond their slot's segment return at once),
so a launch needs no value from the device and fits inside a CUDA graph.

Shapes: x [t, h], a [slots, r, h], y [t, r], b [slots, n, r], out [t, n] (any row stride, so a
column slice of a fused projection's output works in place). The adapter's scaling is folded
into b when it is loaded; ranks below the slot pool's rank are zero-padded.
"""

import torch

from kvflock.kernels._triton import jit, tl

_BLOCK_M = 16  # tl.dot's smallest tile


def _segments(order: torch.Tensor, seg_starts: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    bounds = seg_starts.tolist()
    return [(s, order[bounds[s]:bounds[s + 1]]) for s in range(len(bounds) - 1) if bounds[s + 1] > bounds[s]]


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, order: torch.Tensor, seg_starts: torch.Tensor) -> torch.Tensor:
    """y [t, r]: each adapter token's x row times its slot's A^T; zero rows for the others."""
    y = x.new_zeros(x.shape[0], a.shape[1])
    for slot, rows in _segments(order, seg_starts):
        y[rows] = x[rows] @ a[slot].t()
    return y


def lora_expand_ref(y: torch.Tensor, b: torch.Tensor, order: torch.Tensor, seg_starts: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """out [t, n] += y B_s^T on each adapter token's row, in place; returns out."""
    for slot, rows in _segments(order, seg_starts):
        out[rows] += (y[rows] @ b[slot].t()).to(out.dtype)
    return out


@jit
def _tile_rows(order_ptr, first, end, BLOCK_M: tl.constexpr):
    """The token rows at positions first .. first + BLOCK_M of the grouping, and which of them
    belong to the segment that ends at `end`."""
    pos = first + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    return tl.load(order_ptr + pos, mask=row_ok, other=0), row_ok


@jit
def _shrink_kernel(x_ptr, a_ptr, y_ptr, order_ptr, seg_ptr, h, r,
                   stride_xt, stride_as, stride_ar, stride_yt,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    slot, tile, rb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, end = tl.load(seg_ptr + slot) + tile * BLOCK_M, tl.load(seg_ptr + slot + 1)
    if first >= end:  # the grid covers the longest segment; this slot has fewer tokens
        return
    rows, row_ok = _tile_rows(order_ptr, first, end, BLOCK_M)
    cols = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < r
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, h, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < h
        xt = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + slot * stride_as + cols[None, :] * stride_ar + ks[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(xt, at)
    tl.store(y_ptr + rows[:, None] * stride_yt + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@jit
def _expand_kernel(y_ptr, b_ptr, out_ptr, order_ptr, seg_ptr, n, r,
                   stride_yt, stride_bs, stride_bn, stride_ot,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    slot, tile, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, end = tl.load(seg_ptr + slot) + tile * BLOCK_M, tl.load(seg_ptr + slot + 1)
    if first >= end:  # the grid covers the longest segment; this slot has fewer tokens
        return
    rows, row_ok = _tile_rows(order_ptr, first, end, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < r
    yt = tl.load(y_ptr + rows[:, None] * stride_yt + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                 other=0.0)
    bt = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + ranks[:, None],
                 mask=col_ok[None, :] & rank_ok[:, None], other=0.0)
    delta = tl.dot(yt.to(bt.dtype), bt)
    mask = row_ok[:, None] & col_ok[None, :]
    ptrs = out_ptr + rows[:, None] * stride_ot + cols[None, :]
    base = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (base.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"lora: the last dimension must be contiguous (strides {t.stride()})")


def lora_shrink(x: torch.Tensor, a: torch.Tensor, order: torch.Tensor, seg_starts: torch.Tensor) -> torch.Tensor:
    """Triton version of `lora_shrink_ref`."""
    _check_rows(x, a)
    t, h = x.shape
    slots, r, _ = a.shape
    y = torch.empty(t, r, dtype=x.dtype, device=x.device)  # expand reads only the rows it writes
    block_r = max(16, min(64, _next_power_of_2(r)))
    grid = (slots, -(-t // _BLOCK_M), -(-r // block_r))
    _shrink_kernel[grid](x, a, y, order, seg_starts, h, r, x.stride(0), a.stride(0), a.stride(1), y.stride(0),
                         BLOCK_M=_BLOCK_M, BLOCK_R=block_r, BLOCK_K=64)
    return y


def lora_expand(y: torch.Tensor, b: torch.Tensor, order: torch.Tensor, seg_starts: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """Triton version of `lora_expand_ref` (r up to 128: one tile holds the whole rank)."""
    _check_rows(y, b, out)
    t, n = out.shape
    slots, _, r = b.shape
    block_n = 64
    grid = (slots, -(-t // _BLOCK_M), -(-n // block_n))
    _expand_kernel[grid](y, b, out, order, seg_starts, n, r, y.stride(0), b.stride(0), b.stride(1), out.stride(0),
                         BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_R=max(16, _next_power_of_2(r)))
    return out


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()
