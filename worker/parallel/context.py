"""The math of context parallelism, free of processes: how a prompt chunk is split over the
context-parallel (CP) ranks, attention that also returns its log-sum-exp, the merge of partial
attention results by their log-sum-exp, and ring attention over a sequence of K/V blocks.

Load balance under the causal mask: a chunk of n tokens is cut into 2 * cp equal pieces and CP
rank i computes pieces i and 2 * cp - 1 - i, so every rank holds one early and one late piece
and does the same share of the (triangular) attention work. The chunk is padded at its front to
a multiple of 2 * cp; padding rows have position -1, attend to nothing and are attended by
nothing. Front padding keeps the chunk's last token at the end of piece 2 * cp - 1, which rank 0
computes: the rank that samples.

Attention over part of the keys returns its log-sum-exp with its output
(kvflock.kernels.lse_attention, whose torch reference this module's math uses).

Ring attention: each rank keeps its queries and merges in the K/V block of every rank in turn
(its own first, then the one its left neighbour held a step before), with the online-softmax
merge. `ring_attention` takes the blocks as an iterable, so the same loop runs over a list of
blocks (one process simulating the ring, in the tests) and over blocks arriving from the
neighbour (kvflock.worker.parallel.context_attention).

Where the KV cache of a sequence lives (kvflock.worker.parallel.context_attention): token p on
CP rank p % cp, so that every rank holds 1 / cp of every sequence, whatever path computed it.
"""

from collections.abc import Iterable

import torch

from kvflock.kernels.lse_attention import attention_with_lse_ref as attention_with_lse


def zigzag_rows(n: int, cp: int, rank: int) -> torch.Tensor:
    """The rows of a chunk of `n` tokens that CP rank `rank` computes, -1 for padding: pieces
    `rank` and `2 * cp - 1 - rank` of the chunk cut into 2 * cp pieces after front padding."""
    piece = -(-n // (2 * cp))
    padding = 2 * cp * piece - n
    rows = [torch.arange(i * piece, (i + 1) * piece) - padding for i in (rank, 2 * cp - 1 - rank)]
    return torch.cat(rows).clamp(min=-1)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the results over each: outputs
    [n, h, d] weighted by exp(lse - max), log-sum-exp [n, h] summed in the exponent. A side that
    saw no key (-inf) weighs nothing; if neither saw one, the output stays 0."""
    top = torch.maximum(lse_a, lse_b)
    top = top.masked_fill(top == float("-inf"), 0.0)
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    out = (out_a * w_a[..., None] + out_b * w_b[..., None]) / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
    return out, top + torch.log(total)


def ring_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's queries over every (k, v, k_pos) block of the ring, in the order they arrive,
    merged online; returns the output and log-sum-exp as attention_with_lse over all blocks."""
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for k, v, k_pos in blocks:
        part_out, part_lse = attention_with_lse(q, q_pos, k, v, k_pos, scale)
        if out is None or lse is None:
            out, lse = part_out, part_lse
        else:
            out, lse = merge_attention(out, lse, part_out, part_lse)
    assert out is not None and lse is not None, "a ring has at least the rank's own block"
    return out, lse


def ring_order(cp: int, rank: int) -> list[int]:
    """The ranks whose blocks `rank` sees, in ring order: its own, then its left neighbour's..."""
    return [(rank - step) % cp for step in range(cp)]


def local_token_count(context_len: int, cp: int, rank: int) -> int:
    """Tokens of a sequence of `context_len` that CP rank `rank` stores (token p on rank p % cp)."""
    return max(0, -(-(context_len - rank) // cp))
