"""The KV cache manager: the one owner of the sequences' block tables. It allocates blocks,
finds a starting sequence's cached prefix (in the GPU pool, or in the CPU and disk tiers
below it), registers full blocks for prefix caching, gives back blocks that held only rejected
drafts, and frees a sequence's blocks.

Pure bookkeeping, no tensors and no I/O: blocks the pool evicts while still holding a prefix,
and blocks to fill from the lower tiers, are recorded as transfers (kvflock.worker.step_plan)
that the engine carries out before the next forward pass. The manager asks the tiers only
whether they hold a block and whether restoring it beats recomputing it.
"""

from dataclasses import dataclass, field
from typing import Protocol

from kvflock.shared.hashing import hash_blocks
from kvflock.worker.kv.block_pool import BlockPool
from kvflock.worker.sequence import Sequence
from kvflock.worker.step_plan import BlockRestore, KVTransfers


class LowerTiers(Protocol):
    """The questions the manager asks the CPU and disk tiers (kvflock.worker.kv.tiers)."""

    def contains(self, block_hash: int) -> bool: ...

    def worth_restoring(self, block_hash: int, block_size: int) -> bool: ...


@dataclass
class _SequenceBlocks:
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the sequence's full blocks
    num_cached: int = 0  # leading blocks the pool knows as holding their prefix
    restore: BlockRestore | None = None  # planned, not carried out yet


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 lower_tiers: LowerTiers | None = None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._lower_tiers = lower_tiers
        self.pool = BlockPool(num_blocks, on_evict=self._record_eviction if lower_tiers is not None else None)
        self._sequences: dict[int, _SequenceBlocks] = {}
        self._transfers = KVTransfers()
        self._offloading: set[int] = set()  # hashes of the recorded offloads

    def block_ids(self, seq: Sequence) -> list[int]:
        """A copy of the sequence's block table (a step plan must not change under the runner)."""
        return list(self._blocks(seq).block_ids)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to allocate for the sequence to hold `num_new_tokens` after its computed ones."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(self._blocks(seq).block_ids))

    def can_fit(self, seq: Sequence, num_new_tokens: int, blocks_to_spare: int = 0) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) + blocks_to_spare <= self.pool.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give the sequence the blocks for `num_new_tokens` more tokens; False (and nothing
        allocated) when too few are free."""
        block_ids = self._blocks(seq).block_ids
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(block_ids)
        if need <= 0:
            return True
        if not self.pool.can_allocate(need):
            return False
        block_ids.extend(self.pool.allocate(need))
        return True

    def start(self, seq: Sequence) -> int:
        """Give a starting sequence the blocks of its longest known prefix, cached on the GPU or
        (planned as restores) in a lower tier, and count them as computed; returns the tokens
        they hold. At least one token is always left to compute, for the logits of the next."""
        if not self.enable_prefix_caching:
            return 0
        entry = self._blocks(seq)
        entry.block_hashes = hash_blocks(seq.token_ids, self.block_size, entry.block_hashes, seq.block_hash_root)
        usable = entry.block_hashes[: (seq.num_tokens - 1) // self.block_size]
        entry.block_ids = self.pool.take_cached(usable)
        entry.num_cached = len(entry.block_ids)
        if self._lower_tiers is not None:
            self._plan_restore(seq, entry, usable[entry.num_cached:])
        seq.num_computed_tokens = len(entry.block_ids) * self.block_size
        return seq.num_computed_tokens

    def _plan_restore(self, seq: Sequence, entry: _SequenceBlocks, block_hashes: list[int]) -> None:
        """Continue the cached prefix with blocks to copy back from the CPU or disk tier."""
        wanted = []
        for h in block_hashes:
            if not self._restorable(h):
                break
            wanted.append(h)
        wanted = wanted[: self.pool.num_free]
        if not wanted:
            return
        blocks = self.pool.allocate(len(wanted))
        entry.block_ids.extend(blocks)
        entry.restore = BlockRestore(seq, wanted, blocks)
        self._transfers.restores.append(entry.restore)

    def _restorable(self, block_hash: int) -> bool:
        assert self._lower_tiers is not None
        if block_hash in self._offloading:  # on its way to the CPU tier, where restoring always pays
            return True
        return self._lower_tiers.contains(block_hash) and self._lower_tiers.worth_restoring(block_hash, self.block_size)

    def restore_done(self, restore: BlockRestore, num_restored: int) -> bool:
        """The first `num_restored` blocks of a planned restore hold their prefix now; the rest
        were no longer intact below and stay with the sequence, to be recomputed. False when the
        restore fell short: the sequence's computed tokens end where the restored blocks do."""
        seq = restore.seq
        entry = self._blocks(seq)
        entry.restore = None
        for block, h in zip(restore.block_ids[:num_restored], restore.block_hashes):
            self.pool.cache(block, h)
        entry.num_cached += num_restored
        if num_restored == len(restore.block_ids):
            return True
        seq.num_computed_tokens = entry.num_cached * self.block_size
        return False

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make the blocks the sequence has filled with known tokens findable by later ones."""
        if not self.enable_prefix_caching:
            return
        entry = self._blocks(seq)
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        if full > entry.num_cached:
            entry.block_hashes = hash_blocks(seq.token_ids[: full * self.block_size], self.block_size,
                                             entry.block_hashes, seq.block_hash_root)
            for i in range(entry.num_cached, full):
                self.pool.cache(entry.block_ids[i], entry.block_hashes[i])
            entry.num_cached = full

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks beyond the sequence's tokens, which only rejected drafts used."""
        block_ids = self._blocks(seq).block_ids
        needed = -(-seq.num_tokens // self.block_size)
        if len(block_ids) > needed:
            self.pool.free(block_ids[needed:][::-1])
            del block_ids[needed:]

    def free(self, seq: Sequence) -> None:
        """Give back all of the sequence's blocks, tail first, and forget what was computed."""
        entry = self._sequences.pop(seq.seq_id, None)
        seq.num_computed_tokens = 0
        if entry is None:
            return
        if entry.restore is not None:  # planned but never carried out: its blocks hold nothing
            self._transfers.restores = [r for r in self._transfers.restores if r is not entry.restore]
        self.pool.free(entry.block_ids[::-1])

    def take_transfers(self) -> KVTransfers:
        """The transfers recorded since the last call, to carry out before the next forward pass."""
        transfers, self._transfers = self._transfers, KVTransfers()
        self._offloading.clear()
        return transfers

    def _record_eviction(self, block: int, block_hash: int) -> None:
        self._transfers.offloads.append((block, block_hash))
        self._offloading.add(block_hash)

    def _blocks(self, seq: Sequence) -> _SequenceBlocks:
        entry = self._sequences.get(seq.seq_id)
        if entry is None:
            entry = self._sequences[seq.seq_id] = _SequenceBlocks()
        return entry
