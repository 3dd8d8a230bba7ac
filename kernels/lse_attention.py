"""Attention that also returns the log-sum-exp of its scores, over keys at given positions: the
building block of context parallelism, whose ranks attend over parts of a sequence's keys and
merge the parts by their log-sum-exp.

`attention_with_lse_ref` is the torch reference (it materializes the scores); beside it,
`attention_with_lse` is the Triton kernel with the same signature, a FlashAttention-style online
softmax that never holds more than a tile of scores (the reference at 32k tokens would need
tens of GiB). The kernel needs keys whose positions never decrease (every caller's: a rank's
zigzag pieces, a rank's striped share of the cache), which lets it skip the key tiles that lie
wholly after a query tile.
"""

import torch

from kvflock.kernels._triton import jit, tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def attention_with_lse_ref(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries q [n, hq, d] at positions q_pos [n] over keys and values k, v
    [m, hkv, d] at positions k_pos [m], each query seeing the keys at or before its position
    (negative positions: padding, seen by nothing). GQA: query head h reads KV head
    h // (hq // hkv). Returns the output [n, hq, d] and the log-sum-exp of the scaled scores
    [n, hq], both in float32 (float64 for float64 inputs); a query that sees no key gets output
    0 and log-sum-exp -inf."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.to(acc).view(n, hkv, hq // hkv, d)
    scores = torch.einsum("nhgd,mhd->hgnm", qg, k.to(acc)) * scale
    visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
    scores.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [hkv, g, n]
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    out = torch.einsum("hgnm,mhd->nhgd", probs, v.to(acc))
    return out.reshape(n, hq, d), lse.permute(2, 0, 1).reshape(n, hq)


@jit
def _lse_attention_kernel(
    q_ptr, q_pos_ptr, k_ptr, v_ptr, k_pos_ptr, out_ptr, lse_ptr,
    n, m, qk_scale,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_out_tok, stride_out_head, stride_lse_tok,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (query head, tile of BLOCK_M queries) over the key tiles that start at or before the
    tile's last visible position, scores masked by position, online softmax in base 2."""
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    in_q = rows < n
    q_pos = tl.load(q_pos_ptr + rows, mask=in_q, other=-1)
    q = tl.load(q_ptr + rows[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
                mask=in_q[:, None], other=0.0)
    k_base = k_ptr + (head // GROUP) * stride_k_head
    v_base = v_ptr + (head // GROUP) * stride_v_head
    last = tl.max(q_pos, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, m, BLOCK_N):
        if tl.load(k_pos_ptr + start) <= last:  # keys' positions never decrease: later tiles are later still
            cols = start + tl.arange(0, BLOCK_N)
            in_k = cols < m
            k_pos = tl.load(k_pos_ptr + cols, mask=in_k, other=-1)
            k = tl.load(k_base + cols[:, None] * stride_k_tok + dims[None, :], mask=in_k[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_v_tok + dims[None, :], mask=in_k[:, None], other=0.0)
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen nothing yet keeps m = -inf; shift it by 0 instead (exp2(-inf) = 0).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - shift)
            p = tl.exp2(s - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
            m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(out_ptr + rows[:, None] * stride_out_tok + head * stride_out_head + dims[None, :], out,
             mask=in_q[:, None])
    tl.store(lse_ptr + rows * stride_lse_tok + head, lse, mask=in_q)


def _config(device: torch.device) -> dict[str, int]:
    """Tiles and launch settings; the interpreter (CPU) gets small tiles."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def attention_with_lse(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `attention_with_lse_ref` (float32 results), for keys whose positions
    never decrease."""
    n, hq, d = q.shape
    m, hkv, _ = k.shape
    if d < 16 or d & (d - 1) or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"q, k, v: head_dim {d} must be a power of two >= 16, contiguous")
    out = torch.empty((n, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((n, hq), dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    if m == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    config = _config(q.device)
    _lse_attention_kernel[(hq, -(-n // config["BLOCK_M"]))](
        q, q_pos, k, v, k_pos, out, lse, n, m, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        GROUP=hq // hkv, HEAD_DIM=d, **config,
    )
    return out, lse
