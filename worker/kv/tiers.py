"""The KV cache below the GPU pool: a CPU block pool and a disk store.

A cached block that the GPU pool evicts is copied down to the CPU pool (on a side CUDA stream
on GPUs); a CPU block that the CPU pool evicts is written to disk. A starting request whose
prefix continues in a lower tier gets those blocks copied back instead of recomputing them,
but only while restoring is estimated to be faster than recomputing (both rates measured).
Copies here are synchronous in program order, except the GPU->CPU copy, which the forward
pass waits for (`before_forward`).
"""

import logging
import time
from collections import OrderedDict

import torch

from kvfleet.worker.kv.disk import DiskBlockStore

log = logging.getLogger(__name__)


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

    def offload(self, gpu_block: int, block_hash: int) -> None:
        """Keep an evicted GPU block's content in the CPU pool, or on disk without one."""
        if block_hash in self._slot_of:
            self._slot_of.move_to_end(block_hash)
            return
        self.offloaded_blocks += 1
        if self.num_cpu_blocks == 0:
            if self.disk is not None:
                self.disk.write(block_hash, _as_bytes(self.gpu_cache[gpu_block].cpu()))
            return
        slot = self._free_slots.pop() if self._free_slots else self._evict_cpu_slot()
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.gpu_cache.device))
            with torch.cuda.stream(self._stream):
                self.cpu_cache[slot].copy_(self.gpu_cache[gpu_block], non_blocking=True)
        else:
            self.cpu_cache[slot].copy_(self.gpu_cache[gpu_block])
        self._slot_of[block_hash] = slot

    def _evict_cpu_slot(self) -> int:
        block_hash, slot = self._slot_of.popitem(last=False)
        if self.disk is not None:
            self._sync()
            self.disk.write(block_hash, _as_bytes(self.cpu_cache[slot]))
        return slot

    def worth_restoring(self, block_hash: int, block_size: int) -> bool:
        """CPU copies always beat recomputing; a disk read must be faster than prefilling the
        block's tokens at the measured rate (unmeasured: try the disk)."""
        if block_hash in self._slot_of:
            return True
        if self._disk_seconds_per_block is None or self._prefill_seconds_per_token is None:
            return True
        return self._disk_seconds_per_block < block_size * self._prefill_seconds_per_token

    def restore(self, block_hash: int, gpu_block: int) -> bool:
        """Copy the block back into `gpu_block`. False when the lower tier no longer has it
        intact (the caller recomputes instead)."""
        slot = self._slot_of.get(block_hash)
        if slot is not None:
            if self._stream is not None:  # on the GPU, after pending offloads (no host wait)
                torch.cuda.current_stream(self.gpu_cache.device).wait_stream(self._stream)
            self.gpu_cache[gpu_block].copy_(self.cpu_cache[slot], non_blocking=True)
            self._slot_of.move_to_end(block_hash)
            self.restored_blocks["cpu"] += 1
            return True
        if self.disk is None:
            return False
        started = time.perf_counter()
        payload = self.disk.read(block_hash)
        if payload is None:
            return False
        block = torch.frombuffer(payload, dtype=torch.uint8)
        self.before_forward()  # the block's evicted content must be copied out first
        self.gpu_cache[gpu_block].view(torch.uint8).view(-1).copy_(block)
        self._disk_seconds_per_block = _average(self._disk_seconds_per_block, time.perf_counter() - started)
        self.restored_blocks["disk"] += 1
        return True

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0:
            self._prefill_seconds_per_token = _average(self._prefill_seconds_per_token, seconds / num_tokens)

    def before_forward(self) -> None:
        """Make the forward pass wait for GPU->CPU copies of blocks it may overwrite."""
        if self._stream is not None:
            torch.cuda.current_stream(self.gpu_cache.device).wait_stream(self._stream)

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()


def _as_bytes(block: torch.Tensor) -> bytes:
    return block.contiguous().view(torch.uint8).numpy().tobytes()


def _average(current: float | None, sample: float, weight: float = 0.2) -> float:
    return sample if current is None else (1 - weight) * current + weight * sample
