"""Copies between host and device that never stall the CPU on the GPU's queue.

A plain copy of a CPU tensor to the GPU (or back) synchronizes the stream: the CPU waits
until every step already queued has run. With async scheduling the next step is prepared
while the previous one runs, so such a wait would undo the overlap. Host tensors are made in
pinned memory, which lets the copy be queued behind the GPU's work like a kernel; PyTorch's
pinned allocator keeps a freed buffer until the copies that read it have run.
"""

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, the copy queued on the current stream. The host tensor
    is made in pinned memory directly (`pin_memory()` of a pageable one costs ~40 us more)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """Device tensors copied to pinned host memory behind the work that computes them;
    `wait()` returns the host tensors once the copies have landed."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._host = [t.to("cpu", non_blocking=True) for t in tensors]
        self._done: torch.cuda.Event | None = None
        if tensors and tensors[0].is_cuda:
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(tensors[0].device))

    def wait(self) -> list[torch.Tensor]:
        if self._done is not None:
            self._done.synchronize()
        return self._host
