"""Context parallelism's math on one process: the ring simulated as a list of ranks' blocks
gives exactly (float64) what full causal attention gives, whatever the number of ranks, the
chunk's length (padding) and the GQA ratio; the pieces balance the causal work."""

import pytest
import torch

from kvflock.kernels.lse_attention import attention_with_lse_ref as attention_with_lse
from kvflock.worker.parallel.context import (
    local_token_count,
    merge_attention,
    ring_attention,
    ring_order,
    zigzag_rows,
)

SCALE = 0.25


def causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal softmax attention, GQA by repeating KV heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
    n = q.shape[0]
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def qkv(n: int, hq: int = 4, hkv: int = 2, d: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(n, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))


def gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x[rows.clamp(min=0)]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 16, 37])
def test_ring_attention_over_zigzag_pieces_equals_full_causal_attention(cp, n):
    q, k, v = qkv(n)
    rows = [zigzag_rows(n, cp, r) for r in range(cp)]
    blocks = [(gather(k, r), gather(v, r), r) for r in rows]  # a block's positions are its rows

    out = torch.zeros_like(q)
    for rank in range(cp):
        mine = rows[rank]
        ring = [blocks[j] for j in ring_order(cp, rank)]
        rank_out, _ = ring_attention(gather(q, mine), mine, ring, SCALE)
        out[mine[mine >= 0]] = rank_out[mine >= 0]

    torch.testing.assert_close(out, causal_reference(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cp", [2, 4])
def test_every_token_is_computed_by_exactly_one_rank_and_rank_0_holds_the_last(cp):
    n = 37
    rows = [zigzag_rows(n, cp, r) for r in range(cp)]
    real = torch.cat([r[r >= 0] for r in rows])

    assert sorted(real.tolist()) == list(range(n))
    assert rows[0][-1] == n - 1
    assert len({len(r) for r in rows}) == 1


def test_zigzag_pieces_balance_the_causal_work():
    n, cp = 4096, 4
    work = [int((zigzag_rows(n, cp, r) + 1).sum()) for r in range(cp)]  # a query at p sees p + 1 keys

    assert max(work) / min(work) < 1.001


def test_merging_partial_results_equals_attention_over_the_union():
    n = 12
    q, k, v = qkv(n)
    pos = torch.arange(n)
    first, second = pos % 3 == 0, pos % 3 != 0  # any split of the keys, e.g. striped over ranks

    full = attention_with_lse(q, pos, k, v, pos, SCALE)
    a = attention_with_lse(q, pos, k[first], v[first], pos[first], SCALE)
    b = attention_with_lse(q, pos, k[second], v[second], pos[second], SCALE)
    merged = merge_attention(*a, *b)

    torch.testing.assert_close(merged[0], full[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged[1], full[1], rtol=1e-12, atol=1e-12)


def test_a_query_that_sees_no_key_gets_zero_and_merges_as_nothing():
    q, k, v = qkv(3)
    nothing = attention_with_lse(q, torch.tensor([-1, 0, 1]), k, v, torch.tensor([5, 6, 7]), SCALE)
    assert torch.all(nothing[0] == 0) and torch.all(nothing[1] == float("-inf"))

    some = attention_with_lse(q, torch.arange(3), k, v, torch.arange(3), SCALE)
    merged = merge_attention(*nothing, *some)
    torch.testing.assert_close(merged[0], some[0], rtol=0, atol=0)
    assert torch.all(merge_attention(*nothing, *nothing)[0] == 0)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_striped_storage_gives_each_rank_its_share_of_every_length(cp):
    for n in range(0, 20):
        counts = [local_token_count(n, cp, r) for r in range(cp)]
        assert counts == [len(range(r, n, cp)) for r in range(cp)]
