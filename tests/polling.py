"""Waiting in tests for something that happens in another thread or process."""

import time
from collections.abc import Callable
from typing import Any


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "", interval: float = 0.05) -> Any:
    """Poll until `check()` returns something truthy and return it; fail naming `what` after
    `timeout` seconds (a generous bound against hangs, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or check}; last: {last!r}")
