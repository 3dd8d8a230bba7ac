"""Accounting of KV cache blocks: which ids are free, how many users hold each one, and which
full blocks hold a known prefix (automatic prefix caching).

Pure bookkeeping, no tensors: the runner owns the memory, the pool only hands out ids.
Block 0 is never handed out, so that padded block tables can point at it safely.

A full block is identified by its prefix hash (worker/kvflock/shared/hashing.py). When its last user
frees it, a cached block keeps its hash and goes to the back of the free queue: it can be
found and reused by a later request until it reaches the front and is handed out for
something else (least recently freed first, i.e. LRU eviction).
"""

from collections import OrderedDict
from collections.abc import Callable


class BlockPool:
    """`on_evict(block, block_hash)` is called when a cached block is handed out for something
    else, while it still holds the prefix (the offload tiers keep a copy)."""

    def __init__(self, num_blocks: int, on_evict: Callable[[int, int], None] | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks: need at least 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        self._on_evict = on_evict

    @property
    def num_free(self) -> int:
        """Blocks nobody holds, cached ones included (they are evicted when handed out)."""
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks that can ever be in use at once."""
        return self.num_blocks - 1

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more user of blocks already in use."""
        for b in blocks:
            if self._ref_counts[b] == 0:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go back to the pool, in the
        order given (callers pass a sequence's blocks tail first, so that prefixes, which
        more requests share, are evicted last)."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free[b] = None

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    # -- prefix caching ---------------------------------------------------------------

    def cache(self, block: int, block_hash: int) -> None:
        """Remember that `block` (full, in use) holds the prefix `block_hash`. A prefix that
        another block already holds keeps its first block."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def take_cached(self, block_hashes: list[int]) -> list[int]:
        """The blocks holding the longest cached run of `block_hashes`, each now held once more."""
        blocks = []
        for h in block_hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
            blocks.append(block)
        return blocks

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
            if self._on_evict is not None:
                self._on_evict(block, h)
