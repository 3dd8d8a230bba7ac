"""kvflock: run large language models on Kubernetes.

The offline engine API is re-exported here lazily, so that `import kvflock` (the CLI, the
operator) does not pay for importing torch.
"""

from typing import TYPE_CHECKING, Any

from kvflock.shared.version import __version__
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from kvflock.worker.config import SamplingParams
    from kvflock.worker.llm import LLM


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kvflock.worker.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvflock.worker.config import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kvflock' has no attribute {name!r}")
