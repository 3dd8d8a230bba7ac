"""The paged attention references equal dense causal attention (torch SDPA) on random inputs,
with scattered block ids, ragged lengths and a partially filled last block."""

import pytest
import torch
import torch.nn.functional as F

from kvflock.kernels.paged_attention import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)

NUM_BLOCKS, NUM_LAYERS, BLOCK = 64, 2, 4


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA of the last len(q) positions over all of k ([ctx, hkv, d]) -> [q_len, hq, d]."""
    group = q.shape[1] // k.shape[1]
    q_len, ctx = q.shape[0], k.shape[0]
    mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - q_len, ctx)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1),
        attn_mask=mask, scale=scale,
    )
    return out.transpose(0, 1)


def _scattered_tables(context_lens: list[int], gen: torch.Generator) -> torch.Tensor:
    """Block tables with non-contiguous, shuffled ids (never block 0), padded with 0."""
    ids = (torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1).tolist()
    width = max(-(-c // BLOCK) for c in context_lens)
    tables = []
    for c in context_lens:
        n = -(-c // BLOCK)
        tables.append([ids.pop() for _ in range(n)] + [0] * (width - n))
    return torch.tensor(tables, dtype=torch.int32)


def _slots(table: torch.Tensor, start: int, end: int) -> list[int]:
    return [int(table[p // BLOCK]) * BLOCK + p % BLOCK for p in range(start, end)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2), (8, 1)])
def test_prefill_over_cached_prefix_equals_sdpa(num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    d, scale = 16, 16**-0.5
    context_lens, query_lens = [5, 13, 8, 1], [5, 3, 8, 1]  # partial last blocks, cached prefixes
    tables = _scattered_tables(context_lens, gen)
    kv_cache = torch.randn(NUM_BLOCKS, NUM_LAYERS, 2, BLOCK, num_kv_heads, d, generator=gen)
    kv_layer = kv_cache[:, 1]

    full_k = [torch.randn(c, num_kv_heads, d, generator=gen) for c in context_lens]
    full_v = [torch.randn(c, num_kv_heads, d, generator=gen) for c in context_lens]
    qs = [torch.randn(n, num_heads, d, generator=gen) for n in query_lens]
    for i, c in enumerate(context_lens):  # the cached prefix, written earlier
        prefix = c - query_lens[i]
        if prefix:
            write_kv_ref(full_k[i][:prefix], full_v[i][:prefix], kv_layer, torch.tensor(_slots(tables[i], 0, prefix)))
    new_k = torch.cat([full_k[i][c - n:] for i, (c, n) in enumerate(zip(context_lens, query_lens))])
    new_v = torch.cat([full_v[i][c - n:] for i, (c, n) in enumerate(zip(context_lens, query_lens))])
    slots = sum((_slots(tables[i], c - n, c) for i, (c, n) in enumerate(zip(context_lens, query_lens))), [])
    write_kv_ref(new_k, new_v, kv_layer, torch.tensor(slots))

    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_prefill_attention_ref(
        torch.cat(qs), new_k, new_v, kv_layer, tables, cu, torch.tensor(context_lens, dtype=torch.int32), scale
    )
    expected = torch.cat([_dense(qs[i], full_k[i], full_v[i], scale) for i in range(len(qs))])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2), (8, 1)])
def test_decode_equals_sdpa(num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_heads + num_kv_heads)
    d, scale = 8, 0.3
    context_lens = [1, 7, 16, 30]
    tables = _scattered_tables(context_lens, gen)
    kv_layer = torch.randn(NUM_BLOCKS, NUM_LAYERS, 2, BLOCK, num_kv_heads, d, generator=gen)[:, 0]
    q = torch.randn(len(context_lens), num_heads, d, generator=gen)

    out = paged_decode_attention_ref(q, kv_layer, tables, torch.tensor(context_lens, dtype=torch.int32), scale)

    for i, c in enumerate(context_lens):
        k = torch.cat([kv_layer[b, 0] for b in tables[i].tolist()])[:c]
        v = torch.cat([kv_layer[b, 1] for b in tables[i].tolist()])[:c]
        torch.testing.assert_close(out[i : i + 1], _dense(q[i : i + 1], k, v, scale), rtol=1e-5, atol=1e-5)


def test_write_kv_skips_negative_slots_and_touches_only_its_slots():
    kv_layer = torch.zeros(8, 1, 2, BLOCK, 1, 2)[:, 0]
    k, v = torch.ones(3, 1, 2), torch.full((3, 1, 2), 2.0)
    write_kv_ref(k, v, kv_layer, torch.tensor([5, -1, 9]))
    assert kv_layer[1, 0, 1].eq(1).all() and kv_layer[1, 1, 1].eq(2).all()
    assert kv_layer[2, 0, 1].eq(1).all() and kv_layer[2, 1, 1].eq(2).all()
    assert int((kv_layer != 0).sum()) == 2 * 2 * 2
