"""Paged attention over the block-outermost KV cache: the torch references.

`kv_layer` is one layer's view `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (not
contiguous across blocks). `context_lens[i]` counts every token of sequence i that is in the
cache, including the ones the current step has just written; the queries of sequence i are its
last `q_len` positions. Block tables are padded with block 0 and only the first
`ceil(context_len / block_size)` entries are read.

Beside each reference sits its Triton kernel with the same signature (`paged_decode_attention`,
`paged_prefill_attention`, `write_kv`), the engine's path on CUDA. Both attention kernels use a
FlashAttention-style online softmax in float32, with the score scale folded into base-2
exponents. An fp8 (e4m3) cache holds `value / scale` per layer for K and V; the attention
kernels fold `k_scale` into the score scale and `v_scale` into the output.
"""

import functools

import torch

from kvflock.kernels._triton import jit, tl


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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Varlen causal attention of new query chunks over cached prefix blocks plus the chunk.

    q: [t, hq, d] (all sequences' new tokens, concatenated); k, v: [t, hkv, d], the same
    tokens' keys and values, already written into `kv_layer`, so the reference reads every key
    from the cache. Returns [t, hq, d]. `k_scale`/`v_scale` undo the per-layer scaling of an
    fp8 cache, as in decode.
    """
    del k, v  # already in the cache; kernels may read them directly instead
    out = torch.empty_like(q)
    acc = _acc_dtype(q.dtype)
    starts = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for i, ctx in enumerate(lens):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        seq_k, seq_v = _gather_kv(kv_layer, block_tables[i], ctx)
        seq_k, seq_v = seq_k.to(acc) * k_scale, seq_v.to(acc) * v_scale
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
    key_pos = torch.arange(keys.shape[1], device=q.device)
    mask = key_pos[None, :] >= context_lens[:, None]  # [b, k]
    # Slots past a context hold whatever was there (NaN bit patterns too, e.g. in a fresh fp8
    # cache); a zero probability times NaN is NaN, so those values are zeroed, not just masked.
    values = values.masked_fill(mask[:, :, None, None], 0.0)
    group = num_heads // num_kv_heads
    qg = q.to(acc).view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bkhd->bhgk", qg, keys) * scale
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
    kv_layer[blocks, 0, offsets] = _to_cache(k[keep].to(acc) / k_scale, kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = _to_cache(v[keep].to(acc) / v_scale, kv_layer.dtype)


def _to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round into the cache's dtype; fp8 saturates at its largest value, as the kernel does
    (a plain cast would turn out-of-range values into NaN)."""
    if dtype == torch.float8_e4m3fn:
        limit = torch.finfo(dtype).max
        x = x.clamp(-limit, limit)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
# A split of a decode sequence covers at least this many tokens: shorter splits cost more in
# partial results and reduction than they gain in parallelism.
_MIN_SPLIT_TOKENS = 128


@jit
def _kv_rows(block_table_row, tok, valid, stride_kv_block, stride_kv_slot, PAGE: tl.constexpr):
    """Offsets of cache rows `tok` of one sequence, through its block table (int64: a cache
    can exceed 2**31 elements). Invalid positions read block 0, which is never handed out."""
    block = tl.load(block_table_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
    return block * stride_kv_block + (tok % PAGE) * stride_kv_slot


@jit
def _softmax_step(acc, l, m, q, k, v, keep, qk_scale, MASKED: tl.constexpr):
    """One tile of online softmax: scores of q [M, d] against k [N, d] (base-2 logits),
    `keep` [M, N] masks them when MASKED, then acc/l/m are rescaled to the new row maxima.
    K and V are cast to q's dtype, which dequantizes an fp8 cache (exactly: e4m3 fits in both
    fp16 and bf16)."""
    s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, l, m_new


@jit
def _decode_kernel(
    q_ptr, kv_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, v_scale, num_splits,
    stride_q_seq, stride_q_head, stride_out_seq, stride_out_head,
    stride_kv_block, stride_kv_kv, stride_kv_slot, stride_kv_head, stride_bt_seq,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """One (sequence, KV head, split): all GROUP query heads of the KV head ride as rows of one
    tile (padded to BLOCK_G >= 16 for tl.dot), so each KV row is loaded once per group. Each
    split covers an equal BLOCK_N-aligned share of its own sequence's context; with SPLIT, it
    writes its normalized partial output and log-sum-exp for the reduction kernel."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    real = (g < GROUP)[:, None]
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=real, other=0.0)
    k_ptr = kv_ptr + kv_head * stride_kv_head
    v_ptr = k_ptr + stride_kv_kv
    block_table_row = block_tables_ptr + seq * stride_bt_seq

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for tile in range(start, end, BLOCK_N):
        tok = tile + tl.arange(0, BLOCK_N)
        valid = tok < end
        rows = _kv_rows(block_table_row, tok, valid, stride_kv_block, stride_kv_slot, PAGE)
        k = tl.load(k_ptr + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        acc, l, m = _softmax_step(acc, l, m, q, k, v, valid[None, :], qk_scale, True)

    # An empty split (or an empty sequence) has l == 0: it writes zeros and lse = -inf.
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe[:, None]
    if SPLIT:
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=real)
        lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g < GROUP)
    else:
        out_ptrs = out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(out_ptrs, (out * v_scale).to(out_ptr.dtype.element_ty), mask=real)


@jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, v_scale, num_splits, stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge one (sequence, query head)'s split partials, weighting each by exp2(lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    part = (seq * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + part + s, mask=s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    parts = tl.load(part_out_ptr + (part + s)[:, None] * HEAD_DIM + dims[None, :],
                    mask=(s < num_splits)[:, None], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims,
             (out * v_scale).to(out_ptr.dtype.element_ty))


@jit
def _find_seq(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_M: tl.constexpr):
    """The sequence that owns query tile `tile`. Sequence i owns the tiles from
    cu_seqlens_q[i] // BLOCK_M + i on, which leaves each one at least ceil(q_len / BLOCK_M)
    tiles while the grid needs only t // BLOCK_M + num_seqs tiles; binary search for the last
    sequence whose first tile is <= tile."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@jit
def _prefill_kernel(
    q_ptr, kv_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr, out_ptr,
    qk_scale, v_scale, num_seqs,
    stride_q_tok, stride_q_head, stride_out_tok, stride_out_head,
    stride_kv_block, stride_kv_kv, stride_kv_slot, stride_kv_head, stride_bt_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (query head, tile of BLOCK_M new tokens of one sequence) over every cached key up to
    the causal diagonal. Keys wholly left of the tile's first query need no mask (first loop);
    the diagonal band is masked (second loop). Heads are the grid's fastest axis so that the
    heads of a GQA group run together and share K/V in L2; tiles run last-first, so the
    tiles with the most keys start first."""
    head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = _find_seq(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_M)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first_row = (tile - q_start // BLOCK_M - seq) * BLOCK_M
    if first_row >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len

    rows = first_row + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
                mask=(rows < q_len)[:, None], other=0.0)
    q_pos = prefix + rows
    k_ptr = kv_ptr + (head // GROUP) * stride_kv_head
    v_ptr = k_ptr + stride_kv_kv
    block_table_row = block_tables_ptr + seq * stride_bt_seq

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    diagonal = (prefix + first_row) // BLOCK_N * BLOCK_N
    for tile_start in range(0, diagonal, BLOCK_N):
        tok = tile_start + tl.arange(0, BLOCK_N)
        valid = tok < ctx
        kv_rows = _kv_rows(block_table_row, tok, valid, stride_kv_block, stride_kv_slot, PAGE)
        k = tl.load(k_ptr + kv_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        acc, l, m = _softmax_step(acc, l, m, q, k, v, valid[None, :], qk_scale, False)
    end = tl.minimum(ctx, prefix + first_row + BLOCK_M)
    for tile_start in range(diagonal, end, BLOCK_N):
        tok = tile_start + tl.arange(0, BLOCK_N)
        valid = tok < end
        kv_rows = _kv_rows(block_table_row, tok, valid, stride_kv_block, stride_kv_slot, PAGE)
        k = tl.load(k_ptr + kv_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        causal = tok[None, :] <= q_pos[:, None]
        acc, l, m = _softmax_step(acc, l, m, q, k, v, causal, qk_scale, True)

    out = acc / l[:, None] * v_scale
    out_ptrs = out_ptr + (q_start + rows)[:, None] * stride_out_tok + head * stride_out_head + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < q_len)[:, None])


@jit
def _write_kv_kernel(
    k_ptr, v_ptr, kv_ptr, slot_mapping_ptr, k_scale, v_scale, num_kv_heads,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_kv_block, stride_kv_kv, stride_kv_slot, stride_kv_head,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr, FP8: tl.constexpr,
):
    """One new token: all its KV heads' K and V into its cache slot, divided by the layer's
    scales (IEEE division, as the reference) and, for fp8, saturated to the e4m3 range."""
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    real = heads < num_kv_heads
    dst = kv_ptr + (slot // PAGE) * stride_kv_block + (slot % PAGE) * stride_kv_slot + heads * stride_kv_head + dims
    k = tl.div_rn(tl.load(k_ptr + tok * stride_k_tok + heads * stride_k_head + dims, mask=real).to(tl.float32), k_scale)
    v = tl.div_rn(tl.load(v_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=real).to(tl.float32), v_scale)
    if FP8:
        k = tl.clamp(k, -448.0, 448.0)  # the largest finite float8_e4m3fn
        v = tl.clamp(v, -448.0, 448.0)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=real)
    tl.store(dst + stride_kv_kv, v.to(kv_ptr.dtype.element_ty), mask=real)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_head_layout(name: str, x: torch.Tensor) -> None:
    """Kernels address head_dim as a contiguous power-of-two vector (tl.arange and tl.dot)."""
    head_dim = x.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"{name}: head_dim {head_dim} is not supported; it must be a power of two >= 16")
    if x.stride(-1) != 1:
        raise ValueError(f"{name}: the head_dim axis must be contiguous, got strides {x.stride()}")


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_num_splits(programs: int, max_context: int, device: torch.device) -> int:
    """Split contexts until (sequence, KV head, split) programs fill every SM twice over, but
    never below _MIN_SPLIT_TOKENS per split. More splits than that measured slower on an H100
    (a partial last wave; more partials to reduce). `max_context` comes from the block table's
    width, known on the host, so picking costs no device sync (and suits CUDA graphs)."""
    target = 2 * _num_sms(device)
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), -(-max_context // _MIN_SPLIT_TOKENS)))


def _decode_config(head_dim: int, device: torch.device) -> dict[str, int]:
    """Keys per tile and launch settings (measured on an H100: bench/results/kernels-h100.md)."""
    if device.type != "cuda":
        return {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of `paged_decode_attention_ref`. `num_splits` forces the split-K factor
    (tests, tuning); by default it follows the batch's parallelism."""
    batch, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, _ = kv_layer.shape
    _check_head_layout("q", q)
    _check_head_layout("kv_layer", kv_layer)
    group = num_heads // num_kv_heads
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_splits is None:
        num_splits = _decode_num_splits(batch * num_kv_heads, block_tables.shape[1] * page, q.device)
    split = num_splits > 1
    if split:
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # not read or written without SPLIT
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_layer, block_tables, context_lens, out, part_out, part_lse,
        scale * k_scale * _LOG2E, v_scale, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0),
        GROUP=group, BLOCK_G=max(16, _next_power_of_2(group)), HEAD_DIM=head_dim, PAGE=page,
        SPLIT=split, **_decode_config(head_dim, q.device),
    )
    if split:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out, part_lse, out, v_scale, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=_next_power_of_2(num_splits), num_warps=4,
        )
    return out


def _prefill_config(head_dim: int, device: torch.device) -> dict[str, int]:
    """Tile shape and launch settings. The interpreter (CPU) gets small tiles: it pays per
    element, not per program."""
    if device.type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    # H100, d=128, 4 x 4096 causal: 374 TFLOP/s; BLOCK_N=64 gave 323, BLOCK_M=64 339.
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}


def paged_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton version of `paged_prefill_attention_ref`; like it, reads every key (the new
    chunk's too) from the cache, so k and v only document the call."""
    del k, v
    num_tokens, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, _ = kv_layer.shape
    _check_head_layout("q", q)
    _check_head_layout("kv_layer", kv_layer)
    num_seqs = context_lens.shape[0]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    config = _prefill_config(head_dim, q.device)
    num_tiles = num_tokens // config["BLOCK_M"] + num_seqs
    _prefill_kernel[(num_heads, num_tiles)](
        q, kv_layer, block_tables, cu_seqlens_q, context_lens, out,
        scale * k_scale * _LOG2E, v_scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page, **config,
    )
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Triton version of `write_kv_ref`. Unlike torch's cast, which turns values beyond the
    e4m3 range into NaN, an fp8 cache saturates them at +-448."""
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_head_layout("k", k)
    _check_head_layout("v", v)
    _check_head_layout("kv_layer", kv_layer)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_layer, slot_mapping, k_scale, v_scale, num_kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        HEAD_DIM=head_dim, PAGE=kv_layer.shape[2], BLOCK_H=_next_power_of_2(num_kv_heads),
        FP8=kv_layer.dtype == torch.float8_e4m3fn, num_warps=4,
    )
