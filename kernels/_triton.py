"""Triton where it is installed, otherwise stand-ins that let the kernel modules import.

Each kernel module also holds the torch reference that is the engine's CPU path, and the CPU
wheel of torch does not bring Triton. So the modules import `jit` and `tl` from here: with
Triton missing, `@jit` turns a kernel into a stub that raises a clear error when launched, and
`tl.constexpr` exists so that kernel signatures still evaluate.
"""

from collections.abc import Callable
from typing import Any

__all__ = ["HAS_TRITON", "jit", "tl"]

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:
    HAS_TRITON = False

    class _MissingLanguage:
        """The part of `triton.language` that kernel definitions touch at import time."""

        constexpr = Any

    class _MissingKernel:
        """A kernel that cannot run: launching it (`kernel[grid](...)`) says why."""

        def __init__(self, fn: Callable[..., Any]) -> None:
            self._name = fn.__name__

        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            raise ModuleNotFoundError(
                f"kernel {self._name} needs Triton, which is not installed: "
                "`pip install triton`, or use the torch path (the *_ref functions)"
            )

    tl = _MissingLanguage()  # type: ignore[assignment]
    jit = _MissingKernel  # type: ignore[assignment]
