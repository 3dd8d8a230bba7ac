"""Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter
(TRITON_INTERPRET is set by tests/conftest.py, before any kernel module is imported)."""

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """Where the small-shape tests run: the GPU if present, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gpu() -> torch.device:
    """The GPU, for the real-shape tests marked `gpu`; skips without one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
