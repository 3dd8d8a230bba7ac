"""The KV cache below the GPU pool: a CPU block pool and a disk store.

A cached block that the GPU pool evicts is copied down to the CPU pool (on a side CUDA stream
on GPUs); a CPU block that the CPU pool evicts is written to disk. A starting request whose
prefix continues in a lower tier gets those blocks copied back instead of recomputing them,
but only while restoring is estimated to be faster than recomputing (both rates measured).

Copies are queued and issued in batches, runs of consecutive block ids and CPU slots as one
copy each: a 16k-token prefix is a thousand 2 MiB blocks, and one copy call per block would
cost more in launch overhead than the link needs to move them.
"""

import logging
import time
from collections import OrderedDict
from contextlib import nullcontext

import torch

from kvflock.worker.kv.disk import DiskBlockStore

log = logging.getLogger(__name__)

# 64 MiB of Llama-3-8B KV: pieces large enough for the link's full rate (2 MiB and up), small
# enough that copies up can start while later copies down are still running.
_COPY_CHUNK_BLOCKS = 32


def coalesce(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst) index pairs as (src start, dst start, length) runs that advance together."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, dst, 1))
    return runs


class OffloadTiers:
    def __init__(self, gpu_cache: torch.Tensor, num_cpu_blocks: int, disk: DiskBlockStore | None) -> None:
        self.gpu_cache = gpu_cache
        on_cuda = gpu_cache.device.type == "cuda"
        block_shape = tuple(gpu_cache.shape[1:])
        self.cpu_cache = torch.zeros((num_cpu_blocks, *block_shape), dtype=gpu_cache.dtype, pin_memory=on_cuda)
        self.num_cpu_blocks = num_cpu_blocks
        self.disk = disk
        self._stream = torch.cuda.Stream(device=gpu_cache.device) if on_cuda else None
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # block hash -> CPU slot, LRU first
        self._free_slots = list(range(num_cpu_blocks - 1, -1, -1))
        self._pending: list[tuple[int, int]] = []  # (GPU block, CPU slot) copies not issued yet
        self._pinned: set[int] = set()  # hashes being restored: their slots must not be reused
        self.offloaded_blocks = 0
        self.restored_blocks = {"cpu": 0, "disk": 0}
        # Seconds per block to restore from disk, and seconds per token to prefill: moving
        # averages that decide whether a disk restore beats recomputing.
        self._disk_seconds_per_block: float | None = None
        self._prefill_seconds_per_token: float | None = None

    @property
    def num_cpu_cached(self) -> int:
        return len(self._slot_of)

    def contains(self, block_hash: int) -> bool:
        return block_hash in self._slot_of or (self.disk is not None and block_hash in self.disk)

    def worth_restoring(self, block_hash: int, block_size: int) -> bool:
        """CPU copies always beat recomputing; a disk read must be faster than prefilling the
        block's tokens at the measured rate (unmeasured: try the disk)."""
        if block_hash in self._slot_of:
            return True
        if self._disk_seconds_per_block is None or self._prefill_seconds_per_token is None:
            return True
        return self._disk_seconds_per_block < block_size * self._prefill_seconds_per_token

    # -- down: GPU -> CPU -> disk -------------------------------------------------------

    def offload(self, gpu_block: int, block_hash: int) -> None:
        """Keep an evicted GPU block's content in the CPU pool (or on disk without one). The
        copy is queued; it is issued before anything can overwrite the GPU block."""
        if block_hash in self._slot_of:
            self._slot_of.move_to_end(block_hash)
            return
        self.offloaded_blocks += 1
        slot = self._free_slots.pop() if self._free_slots else self._evict_cpu_slot()
        if slot is None:
            if self.disk is not None:
                self.disk.write(block_hash, _as_bytes(self.gpu_cache[gpu_block].cpu()))
            return
        self._pending.append((gpu_block, slot))
        self._slot_of[block_hash] = slot

    def _evict_cpu_slot(self) -> int | None:
        """The least recently used CPU slot that is not being restored, written to disk."""
        victim = next((h for h in self._slot_of if h not in self._pinned), None)
        if victim is None:
            return None
        slot = self._slot_of.pop(victim)
        if self.disk is not None:
            self._flush()
            self._sync()
            self.disk.write(victim, _as_bytes(self.cpu_cache[slot]))
        return slot

    def _flush(self) -> dict[int, torch.cuda.Event]:
        """Issue the queued GPU->CPU copies (after the work that produced those blocks), in
        chunks; returns, on CUDA, the event after which each copied GPU block may be reused."""
        copied: dict[int, torch.cuda.Event] = {}
        if not self._pending:
            return copied
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.gpu_cache.device))
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            for block, slot, n in _chunks(coalesce(self._pending)):
                self.cpu_cache[slot : slot + n].copy_(self.gpu_cache[block : block + n], non_blocking=True)
                if self._stream is not None:
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    copied.update(dict.fromkeys(range(block, block + n), event))
        self._pending.clear()
        return copied

    # -- up: CPU or disk -> GPU --------------------------------------------------------

    def pin(self, block_hashes: list[int]) -> None:
        """Keep these hashes' CPU slots while the caller allocates GPU blocks to restore them
        into (allocation may evict GPU blocks into the CPU pool)."""
        self._pinned.update(block_hashes)

    def restore(self, block_hashes: list[int], gpu_blocks: list[int]) -> int:
        """Copy the blocks of `block_hashes` back into `gpu_blocks`, in order; returns how
        many were restored (the rest are no longer intact in a lower tier: recompute them).

        The GPU blocks to fill were mostly just evicted, so their old content is still on its
        way down to the CPU pool. Each chunk copied up waits only for the chunks copied down
        that it overwrites: the two directions of the link run at once instead of one after
        the other."""
        copied_down = self._flush()
        compute = torch.cuda.current_stream(self.gpu_cache.device) if self._stream is not None else None
        done, from_cpu = 0, []
        for block_hash, gpu_block in zip(block_hashes, gpu_blocks):
            slot = self._slot_of.get(block_hash)
            if slot is not None:
                from_cpu.append((slot, gpu_block))
                self._slot_of.move_to_end(block_hash)
            else:
                if compute is not None and gpu_block in copied_down:
                    compute.wait_event(copied_down[gpu_block])
                if not self._restore_from_disk(block_hash, gpu_block):
                    break
            done += 1
        for slot, block, n in _chunks(coalesce(from_cpu)):
            if compute is not None:
                for event in {copied_down[b] for b in range(block, block + n) if b in copied_down}:
                    compute.wait_event(event)
            self.gpu_cache[block : block + n].copy_(self.cpu_cache[slot : slot + n], non_blocking=True)
        self.restored_blocks["cpu"] += len(from_cpu)
        self._pinned.clear()
        return done

    def _restore_from_disk(self, block_hash: int, gpu_block: int) -> bool:
        if self.disk is None:
            return False
        started = time.perf_counter()
        payload = self.disk.read(block_hash)
        if payload is None:
            return False
        self.gpu_cache[gpu_block].view(torch.uint8).view(-1).copy_(torch.frombuffer(payload, dtype=torch.uint8))
        self._disk_seconds_per_block = _average(self._disk_seconds_per_block, time.perf_counter() - started)
        self.restored_blocks["disk"] += 1
        return True

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0:
            self._prefill_seconds_per_token = _average(self._prefill_seconds_per_token, seconds / num_tokens)

    def before_forward(self) -> None:
        """Issue queued offloads and make later GPU work wait for them, so no block is
        overwritten before its content is safe in the CPU pool."""
        self._flush()
        if self._stream is not None:
            torch.cuda.current_stream(self.gpu_cache.device).wait_stream(self._stream)

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()


def _chunks(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Runs cut into pieces of at most _COPY_CHUNK_BLOCKS blocks."""
    return [(src + i, dst + i, min(_COPY_CHUNK_BLOCKS, n - i)) for src, dst, n in runs
            for i in range(0, n, _COPY_CHUNK_BLOCKS)]


def _as_bytes(block: torch.Tensor) -> bytes:
    return block.contiguous().view(torch.uint8).numpy().tobytes()


def _average(current: float | None, sample: float, weight: float = 0.2) -> float:
    return sample if current is None else (1 - weight) * current + weight * sample
