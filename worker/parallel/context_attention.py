"""Attention of a context-parallel (CP) rank: the attention backend a model's layers call when
one replica spans several CP ranks, and the process group it talks over.

Where the KV cache lives: token p of a sequence on CP rank p % cp. A block of the scheduler
(block_size tokens, one block id) is a block of block_size / cp tokens on every CP rank, under
the same id; so the scheduler and the KV cache manager count blocks exactly as with one rank,
and every rank holds 1 / cp of every sequence whichever way it was computed.

A step's tokens come in two kinds (kvflock.worker.parallel.context_step decides which):
- whole tokens (decodes, short prefill chunks) are computed by every CP rank alike. Each rank
  writes the ones it owns, attends them over its share of the cache, and the ranks merge their
  partial results by log-sum-exp with two all-reduces (a max, then a sum), so every rank ends
  with the same output.
- split tokens (a long prefill chunk) are computed by one rank each (zigzag pieces,
  kvflock.worker.parallel.context). Ring attention merges each rank's queries with the chunk's
  K/V blocks as they pass around the ring, and each rank stores the passing tokens it owns. The
  cached prefix before the chunk stays where it is: the chunk's queries are all-gathered, every
  rank attends them over its share of the prefix, and the partials are merged as above.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kvflock.kernels import lse_attention, paged_attention
from kvflock.worker.attention import AttentionBackend, AttentionMetadata
from kvflock.worker.parallel.context import local_token_count, merge_attention, ring_order


@dataclass(frozen=True)
class ContextGroup:
    """One process's place among the CP ranks that share its tensor-parallel rank; `pg` carries
    activations (NCCL on GPU, gloo on CPU). A group of one talks to nobody."""

    rank: int = 0
    size: int = 1
    pg: Any = None

    def all_reduce(self, x: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `x` over the ranks in place (`op`: sum or max)."""
        if self.pg is not None:
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            self.pg.allreduce([x], opts).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` (all of one shape), stacked by rank: [size, *x.shape]."""
        if self.pg is None:
            return x[None]
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.allgather([parts], [x.contiguous()]).wait()
        return torch.stack(parts)

    def ring(self, block: torch.Tensor) -> Iterator[torch.Tensor]:
        """This rank's `block`, then the blocks of the ranks before it (ring_order), each passed on
        to the next rank while the caller works on it. Even ranks send first and odd ranks receive
        first: with NCCL, two ranks exchanging over one pair's stream would otherwise both wait."""
        current = block.contiguous()
        for step in range(self.size):
            if step == self.size - 1:
                yield current
                return
            received = torch.empty_like(current)
            works = self._exchange(current, received, step)
            yield current
            for work in works:
                work.wait()
            current = received

    def _exchange(self, outgoing: torch.Tensor, incoming: torch.Tensor, tag: int) -> list[Any]:
        after, before = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        if self.rank % 2 == 0:
            return [self.pg.send([outgoing], after, tag), self.pg.recv([incoming], before, tag)]
        return [self.pg.recv([incoming], before, tag), self.pg.send([outgoing], after, tag)]


@dataclass
class SeqSlice:
    """One sequence's rows among a rank's local rows, and what it attends in the cache."""

    start: int  # first local row
    stop: int
    table: int  # its row of the block tables
    context_len: int  # tokens of the sequence in the cache after the step (whole) / before the chunk (split)


@dataclass
class ContextParallelMetadata(AttentionMetadata):
    """One step on one CP rank. The rows of its tokens are the whole tokens [0, num_whole), then the
    split ones, the same number on every rank (padded). AttentionMetadata's `slot_mapping` says
    where this rank stores its own rows (-1 for tokens another rank owns, or padding),
    `block_tables` are the scheduler's; `context_lens`, `cu_seqlens_q` and `is_decode` go unread."""

    num_whole: int = 0
    q_pos: torch.Tensor | None = None  # [rows] position of each local row, -1 for padding
    whole: list[SeqSlice] | None = None
    split: list[SeqSlice] | None = None  # rows relative to num_whole; context_len: the cached prefix
    split_pos: torch.Tensor | None = None  # [cp, split rows]: positions of every rank's split rows
    split_slots: torch.Tensor | None = None  # [cp, split rows]: where this rank stores each rank's split rows

    @property
    def split_prefix(self) -> bool:
        """Whether some split chunk follows a cached prefix."""
        return any(s.context_len > 0 for s in self.split or [])


class ContextParallelAttention:
    """The attention backend of a CP rank (see the module's docstring); `inner` is the backend the
    rank would use alone, whose Triton choice it keeps: for writing the cache, for attention
    (kvflock.kernels.lse_attention) and for the model's pointwise kernels. The kernels are looked
    up on their modules at each call, as TritonAttentionBackend does."""

    def __init__(self, inner: AttentionBackend, group: ContextGroup) -> None:
        self.inner = inner
        self.group = group
        self.triton_pointwise = inner.triton_pointwise

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        assert isinstance(meta, ContextParallelMetadata) and meta.q_pos is not None
        self._write(k, v, kv_layer, meta.slot_mapping, k_scale, v_scale)
        n = meta.num_whole
        out = torch.empty_like(q)
        ring = self._ring(q[n:], k[n:], v[n:], kv_layer, meta, scale, k_scale, v_scale) if meta.split else None

        # Partials over this rank's share of the cache: whole rows, then every rank's split rows.
        parts = [self._over_cache(q[:n], meta.q_pos[:n], s, kv_layer, meta, scale, k_scale, v_scale)
                 for s in meta.whole or []]
        num_split = q.shape[0] - n
        if meta.split_prefix:
            assert meta.split and meta.split_pos is not None
            every_q = self.group.all_gather(q[n:])
            for origin in range(self.group.size):
                parts += [self._over_cache(every_q[origin], meta.split_pos[origin], s, kv_layer, meta, scale,
                                           k_scale, v_scale) for s in meta.split]
        if parts:
            cached_out, cached_lse = _merge_over_ranks(torch.cat([p[0] for p in parts]),
                                                       torch.cat([p[1] for p in parts]), self.group)
            out[:n] = cached_out[:n].to(q.dtype)
        if ring is not None:
            ring_out, ring_lse = ring
            if meta.split_prefix:
                mine = slice(n + self.group.rank * num_split, n + (self.group.rank + 1) * num_split)
                ring_out, ring_lse = merge_attention(ring_out, ring_lse, cached_out[mine], cached_lse[mine])
            out[n:] = ring_out.to(q.dtype)
        return out

    def _attend(self, q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        attend = lse_attention.attention_with_lse if self.triton_pointwise else lse_attention.attention_with_lse_ref
        return attend(q, q_pos, k, v, k_pos, scale)

    def _write(self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slots: torch.Tensor,
               k_scale: float, v_scale: float) -> None:
        write = paged_attention.write_kv if self.triton_pointwise else paged_attention.write_kv_ref
        write(k, v, kv_layer, slots, k_scale, v_scale)

    def _ring(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
              meta: ContextParallelMetadata, scale: float, k_scale: float,
              v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The split rows' attention over the chunks' K/V (ring attention); each passing block's
        tokens that this rank owns are stored on the way (its own rows were written already)."""
        assert meta.split is not None and meta.split_pos is not None and meta.split_slots is not None
        cp, rank = self.group.size, self.group.rank
        q_pos = meta.split_pos[rank]
        out: torch.Tensor | None = None
        lse: torch.Tensor | None = None
        block = torch.stack([k, v], dim=1)
        if kv_layer.dtype != k.dtype:  # attend to the chunk as the cache holds it, as one rank would
            block = _through_cache(block, kv_layer.dtype, k_scale, v_scale)
        for origin, passing in zip(ring_order(cp, rank), self.group.ring(block)):
            if origin != rank:
                self._write(passing[:, 0], passing[:, 1], kv_layer, meta.split_slots[origin], k_scale, v_scale)
            k_pos = meta.split_pos[origin]
            parts = [self._attend(q[s.start:s.stop], q_pos[s.start:s.stop], passing[s.start:s.stop, 0],
                                  passing[s.start:s.stop, 1], k_pos[s.start:s.stop], scale) for s in meta.split]
            part_out, part_lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            if out is None or lse is None:
                out, lse = part_out, part_lse
            else:
                out, lse = merge_attention(out, lse, part_out, part_lse)
        assert out is not None and lse is not None
        return out, lse

    def _over_cache(self, q: torch.Tensor, q_pos: torch.Tensor, s: SeqSlice, kv_layer: torch.Tensor,
                    meta: ContextParallelMetadata, scale: float, k_scale: float,
                    v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows s.start:s.stop of q over the first s.context_len tokens of their sequence, as far as
        this rank stores them (positions rank, rank + cp, ...)."""
        cp, rank = self.group.size, self.group.rank
        n = local_token_count(s.context_len, cp, rank)
        page = kv_layer.shape[2]
        blocks = kv_layer[meta.block_tables[s.table, : -(-n // page)].long()]  # [blocks, 2, page, hkv, d]
        keys = blocks[:, 0].flatten(0, 1)[:n]
        values = blocks[:, 1].flatten(0, 1)[:n]
        if keys.dtype != q.dtype or k_scale != 1.0 or v_scale != 1.0:  # an fp8 cache holds value / scale
            keys, values = (keys.float() * k_scale).to(q.dtype), (values.float() * v_scale).to(q.dtype)
        k_pos = torch.arange(n, device=q.device) * cp + rank
        return self._attend(q[s.start:s.stop], q_pos[s.start:s.stop], keys, values, k_pos, scale)


def _through_cache(block: torch.Tensor, dtype: torch.dtype, k_scale: float, v_scale: float) -> torch.Tensor:
    """K/V [n, 2, h, d] rounded as a cache of `dtype` (fp8) stores them and read back."""
    scales = torch.tensor([k_scale, v_scale], dtype=torch.float32, device=block.device).view(1, 2, 1, 1)
    limit = torch.finfo(dtype).max
    stored = (block.float() / scales).clamp(-limit, limit).to(dtype)
    return (stored.float() * scales).to(block.dtype)


def _merge_over_ranks(out: torch.Tensor, lse: torch.Tensor, group: ContextGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_attention across the CP ranks, each holding the partial result over its keys: the
    largest log-sum-exp (a max all-reduce) scales every rank's share, then one sum all-reduce of
    the weighted outputs and weights. Every rank gets the merged result."""
    top = group.all_reduce(lse.clone(), dist.ReduceOp.MAX)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weight = torch.exp(lse - top)
    packed = group.all_reduce(torch.cat([out * weight[..., None], weight[..., None]], dim=-1))
    total = packed[..., -1]
    merged = packed[..., :-1] / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
    return merged, top + torch.log(total)
