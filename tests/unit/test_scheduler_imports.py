"""The scheduler decides and the engine moves data: importing it must pull in neither torch
nor the KV offload tiers (which copy blocks), directly or through its own imports."""

import subprocess
import sys

_CHECK = """
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import kvflock.worker.scheduler
loaded = sorted(m for m, module in sys.modules.items() if module is not None
                and (m.split(".")[0] == "torch" or m == "kvflock.worker.kv.tiers"))
assert not loaded, loaded
"""


def test_the_scheduler_imports_neither_torch_nor_the_kv_tiers():
    result = subprocess.run([sys.executable, "-P", "-c", _CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
