"""Paged attention over the block-outermost KV cache: the torch references.

`kv_layer` is one layer's view `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (not
contiguous across blocks). `context_lens[i]` counts every token of sequence i that is in the
cache, including the ones the current step has just written; the queries of sequence i are its
last `q_len` positions. Block tables are padded with block 0 and only the first
`ceil(context_len / block_size)` entries are read.
"""

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or in float64 when the inputs are float64 (exactness tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather_kv(
    kv_layer: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's cached K and V as dense `[context_len, num_kv_heads, head_dim]`."""
    block_size = kv_layer.shape[2]
    num_blocks = -(-context_len // block_size)
    blocks = kv_layer[block_table[:num_blocks].long()]  # [n, 2, bs, hkv, d]
    k = blocks[:, 0].flatten(0, 1)[:context_len]
    v = blocks[:, 1].flatten(0, 1)[:context_len]
    return k, v


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of the last `len(q)` positions over `len(k)` keys, GQA by head repeat.

    q: [q_len, hq, d]; k, v: [ctx, hkv, d]. Softmax runs in float32 (float64 for float64 inputs).
    """
    q_len, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    acc = _acc_dtype(q.dtype)
    scores = torch.einsum("qhd,khd->hqk", q.to(acc), k.to(acc)) * scale
    query_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
    key_pos = torch.arange(ctx, device=q.device)[None, :]
    scores.masked_fill_(key_pos > query_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.to(acc)).to(q.dtype)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Varlen causal attention of new query chunks over cached prefix blocks plus the chunk.

    q: [t, hq, d] (all sequences' new tokens, concatenated); k, v: [t, hkv, d], the same
    tokens' keys and values, already written into `kv_layer`, so the reference reads every key
    from the cache. Returns [t, hq, d].
    """
    del k, v  # already in the cache; kernels may read them directly instead
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for i, ctx in enumerate(lens):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        seq_k, seq_v = _gather_kv(kv_layer, block_tables[i], ctx)
        out[lo:hi] = _attend(q[lo:hi], seq_k, seq_v, scale)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per sequence over its cached context, batched with a length mask.

    q: [b, hq, d]; block_tables: [b, m]; context_lens: [b]. Returns [b, hq, d].
    `k_scale`/`v_scale` undo the per-layer scaling of an fp8 cache.
    """
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_layer.shape
    max_blocks = -(-int(context_lens.max()) // block_size)
    blocks = kv_layer[block_tables[:, :max_blocks].long()]  # [b, m, 2, bs, hkv, d]
    acc = _acc_dtype(q.dtype)
    keys = blocks[:, :, 0].flatten(1, 2).to(acc) * k_scale  # [b, m*bs, hkv, d]
    values = blocks[:, :, 1].flatten(1, 2).to(acc) * v_scale
    group = num_heads // num_kv_heads
    qg = q.to(acc).view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bkhd->bhgk", qg, keys) * scale
    key_pos = torch.arange(keys.shape[1], device=q.device)
    mask = key_pos[None, :] >= context_lens[:, None]  # [b, k]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgk,bkhd->bhgd", probs, values)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store new tokens' K and V at `slot = block_id * block_size + offset`; slot -1 is skipped.

    k, v: [t, hkv, d]. With an fp8 cache the values are divided by the layer's scale first.
    """
    block_size = kv_layer.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    acc = _acc_dtype(k.dtype)
    kv_layer[blocks, 0, offsets] = (k[keep].to(acc) / k_scale).to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = (v[keep].to(acc) / v_scale).to(kv_layer.dtype)
