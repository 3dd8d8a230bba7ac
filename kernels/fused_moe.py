"""A mixture-of-experts SwiGLU layer over routed tokens: the torch reference, which runs each
expert on the tokens routed to it, and the fused path, which sorts the (token, expert) pairs by
expert and runs one grouped GEMM per projection over all experts (Triton).

Shapes: x [t, h]; `w13` [e, 2i, h] holds each expert's gate and up projections as one [2i, h]
matrix ([gate | up] along the output features); `w2` [e, h, i] the down projections; `topk_ids`
[t, k] the experts each token goes to and `topk_weights` [t, k] their weights. An id equal to e
(one past the last expert) means "not here": under expert parallelism a rank holds only some
experts and skips the pairs routed elsewhere, whose share another rank adds.

The weights may be stored in any layout (the kernel takes every stride); the engine stores each
expert's matrices input-major, as it stores the dense layers (kvflock.worker.model.parallel).

The fused path has no host synchronization and no shape that depends on the routing: the
sorted pairs are padded, per expert, to a multiple of the row tile, into a buffer sized for the
worst case (every expert padded), and the tiles past the used ones end at once. So it runs under
CUDA graph capture and with async scheduling.
"""

import torch
import torch.nn.functional as F

from kvflock.kernels._triton import jit, tl
from kvflock.kernels.activation import silu_and_mul


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """sum over k of topk_weights[:, k] * expert_{topk_ids[:, k]}(x), in x's dtype, expert by
    expert in ascending order as transformers does (each expert's output is rounded to x's dtype
    before it is weighted; the weight may be float32, as Mixtral's are)."""
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(x.dtype))
    return out


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (flat indices into topk_ids, pair = token * k + slot) grouped by expert, each
    group padded to a multiple of `block_m` with the index t * k (no pair), and the expert of
    every tile of `block_m` rows (-1 for the unused tiles at the end). Ids equal to
    `num_experts` are left out. Sizes depend only on the shapes, never on the routing."""
    flat = topk_ids.reshape(-1).long()
    pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank_in_expert = torch.arange(pairs, device=device) - (counts.cumsum(0) - counts)[expert]
    num_blocks = -(-(pairs + num_experts * (block_m - 1)) // block_m)
    size = num_blocks * block_m
    dest = torch.where(expert == num_experts, size, padded_end[expert] - padded[expert] + rank_in_expert)
    pair_ids = torch.full((size + 1,), pairs, dtype=torch.long, device=device).scatter_(0, dest, order)[:size]
    starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end[:num_experts].contiguous(), starts, right=True)
    return pair_ids, torch.where(block_expert < num_experts, block_expert, -1)


@jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, pair_ids_ptr, block_expert_ptr, weights_ptr,
    n, k, num_pairs, pairs_per_row,
    stride_a, stride_we, stride_wn, stride_wk, stride_out,
    WEIGHTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out[pair, n-tile] = a[pair // pairs_per_row] @ W_expert^T (times the pair's weight when
    WEIGHTED) for the BLOCK_M pairs of tile `program_id(0)`, which all go to one expert."""
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= 0:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(pair_ids_ptr + offs_m)
        valid = pairs < num_pairs
        rows = (pairs // pairs_per_row).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k
            a = tl.load(a_ptr + rows[:, None] * stride_a + offs_k[None, :],
                        mask=valid[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        if WEIGHTED:
            acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
        out = out_ptr + pairs.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


def _block_m(pairs: int, num_experts: int) -> int:
    """Row tile: as small as tl.dot allows (16) when each expert gets a few pairs (decode), where
    padding would otherwise multiply the work; larger as the pairs per expert grow (prefill)."""
    per_expert = pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64


def _grouped_gemm(
    a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, pair_ids: torch.Tensor, block_expert: torch.Tensor,
    block_m: int, pairs_per_row: int, weights: torch.Tensor | None,
) -> None:
    n, k = w.shape[1], w.shape[2]
    block_n, block_k = 64, 64
    grid = (block_expert.numel(), -(-n // block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, pair_ids, block_expert, weights if weights is not None else out,
        n, k, out.shape[0], pairs_per_row,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        WEIGHTED=weights is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=a.dtype == torch.float32, num_warps=4, num_stages=3 if a.is_cuda else 1,
    )


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Triton version of `fused_moe_ref`: sort the pairs by expert, one grouped GEMM for gate/up
    over all experts, the fused SiLU-and-multiply, one grouped GEMM for down that also applies
    the routing weight (in float32, rounded once), then each token's k rows summed."""
    t, h = x.shape
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    pairs = t * top_k
    block_m = _block_m(pairs, num_experts)
    pair_ids, block_expert = sort_by_expert(topk_ids, num_experts, block_m)
    gate_up = x.new_zeros(pairs, w13.shape[1])  # the rows of pairs skipped here stay finite
    _grouped_gemm(x, w13, gate_up, pair_ids, block_expert, block_m, top_k, None)
    act = silu_and_mul(gate_up)
    out = x.new_zeros(pairs, h)  # pairs routed to another rank's experts stay zero
    _grouped_gemm(act, w2, out, pair_ids, block_expert, block_m, 1, topk_weights.reshape(-1).contiguous())
    return out.view(t, top_k, h).sum(1)
