"""Which replica most likely holds which prompt blocks: the router's approximate mirror of the
workers' prefix caches.

Each replica gets an LRU set of the chained block hashes of the prompts routed to it, capped at
its KV cache size in blocks, because a worker evicts its least recently used blocks the same
way. The mirror is approximate by design (the router never asks a worker what it holds): a
wrong guess costs one prefill, never a wrong answer.
"""

from collections import OrderedDict
from collections.abc import Iterable, Sequence

# Blocks remembered per replica until its /metrics reports the real KV cache size.
DEFAULT_CAPACITY_BLOCKS = 1 << 16


class PrefixIndex:
    def __init__(self, default_capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        self._default_capacity = default_capacity
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}

    def matched_blocks(self, block_hashes: Sequence[int], replicas: Iterable[str]) -> dict[str, int]:
        """How many leading blocks of the prompt each replica holds (chained hashes: a block
        counts only when every block before it counts too)."""
        matches: dict[str, int] = {}
        for replica in replicas:
            held = self._blocks.get(replica)
            n = 0
            if held:
                for block in block_hashes:
                    if block not in held:
                        break
                    n += 1
            matches[replica] = n
        return matches

    def record(self, replica: str, block_hashes: Sequence[int]) -> None:
        """The replica is about to compute (and so cache) these blocks.

        The leading blocks become the most recently used, so that eviction trims a prompt
        from its tail and a remembered chain never loses its head."""
        held = self._blocks.setdefault(replica, OrderedDict())
        for block in reversed(block_hashes):
            held[block] = None
            held.move_to_end(block)
        self._evict(replica)

    def set_capacity(self, replica: str, blocks: int) -> None:
        """The replica's KV cache holds at most this many blocks."""
        self._capacity[replica] = max(1, blocks)
        self._evict(replica)

    def retain(self, replicas: Iterable[str]) -> None:
        """Forget every replica not listed (removed from the fleet)."""
        keep = set(replicas)
        for replica in [r for r in self._blocks if r not in keep]:
            del self._blocks[replica]
        for replica in [r for r in self._capacity if r not in keep]:
            del self._capacity[replica]

    def forget(self, replica: str) -> None:
        """The replica lost its cache (it restarted)."""
        self._blocks.pop(replica, None)

    def _evict(self, replica: str) -> None:
        held = self._blocks.get(replica)
        if held is None:
            return
        capacity = self._capacity.get(replica, self._default_capacity)
        while len(held) > capacity:
            held.popitem(last=False)
