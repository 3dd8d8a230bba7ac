"""Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter.

`triton.jit` decides between compiling and interpreting when a kernel is defined, so
TRITON_INTERPRET is set here, before the test modules import the kernels, and kernel modules
that an earlier test directory already imported are reloaded. Without CUDA no compiled Triton
kernel can run in this process anyway, so the setting cannot change another test's path.
"""

import importlib
import os
import sys

import pytest
import torch

KERNEL_MODULES = (
    "kvfleet.kernels.paged_attention",
    "kvfleet.kernels.norm",
    "kvfleet.kernels.rotary",
    "kvfleet.kernels.activation",
)

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


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
