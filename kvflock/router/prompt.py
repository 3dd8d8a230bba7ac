"""A request's routing features: its prompt length and the chained hashes of its leading blocks.

The hashes follow the workers' prefix cache: a block is `block_size` tokens, and its hash
covers its parent's hash and its own token ids, so equal hashes mean equal prefixes. With the
model's tokenizer the router sees the very tokens a worker computes (chat prompts rendered by
the same template, text encoded without special tokens, as the engine does). Without one it
hashes characters instead, `CHARS_PER_TOKEN` per token: prompts that share a prefix still
share leading hashes, and lengths are estimates. A LoRA adapter's prompt hashes from a root of
its own (`adapter_root`), as a worker's does, so the prefix index never takes its blocks for
the base model's; the router's root comes from the adapter's name, the worker's from its
weights: the index only ever compares the router's hashes with each other.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

from kvflock.router.policy import RequestFeatures
from kvflock.shared.chat import render_chat
from kvflock.shared.hashing import hash_blocks

CHARS_PER_TOKEN = 4
# Hashing stops here: prefixes this long already decide the route, and the cost stays bounded.
MAX_HASHED_BLOCKS = 512


def adapter_root(name: str) -> int:
    """What the blocks of a prompt for the adapter `name` hash from."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=b"kvflock-lora").digest(), "little")


def chained_block_hashes(units: Sequence[int] | str, block_size: int, root: int | None = None) -> tuple[int, ...]:
    """The hash of every full block of `units` (token ids, or characters as their code points),
    each over its parent's, the first over `root`: the workers' prefix-cache hashes (kvflock.shared.hashing)."""
    units = units[: MAX_HASHED_BLOCKS * block_size]
    return tuple(hash_blocks([ord(c) for c in units] if isinstance(units, str) else list(units), block_size,
                             root=root))


class PromptReader:
    """Reads the prompt out of an OpenAI request body and turns it into `RequestFeatures`."""

    def __init__(self, block_size: int = 16, tokenizer: Any | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.block_size = block_size
        self.tokenizer = tokenizer

    def features(self, path: str, body: dict[str, Any], adapter: str | None = None) -> RequestFeatures:
        """Features of a /v1/completions or /v1/chat/completions body (for the LoRA `adapter` its
        `model` names, if it does). A batch of prompts is routed by its first prompt's prefix
        and its longest prompt's length."""
        prompts = self._prompts(path, body)
        if not prompts:
            return RequestFeatures(prompt_tokens=0, adapter=adapter)
        units = [self._units(p) for p in prompts]
        lengths = [len(u) if not isinstance(u, str) else math.ceil(len(u) / CHARS_PER_TOKEN) for u in units]
        first = units[0]
        size = self.block_size * CHARS_PER_TOKEN if isinstance(first, str) else self.block_size
        root = adapter_root(adapter) if adapter is not None else None
        return RequestFeatures(prompt_tokens=max(lengths), block_hashes=chained_block_hashes(first, size, root),
                               adapter=adapter)

    def _prompts(self, path: str, body: dict[str, Any]) -> list[str | list[int]]:
        if path.endswith("/chat/completions"):
            messages = body.get("messages")
            return [self._chat_text(messages)] if isinstance(messages, list) else []
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [prompt]
        if _is_token_ids(prompt):
            return [prompt]
        if isinstance(prompt, list):
            return [p for p in prompt if isinstance(p, str) or _is_token_ids(p)]
        return []

    def _units(self, prompt: str | list[int]) -> str | list[int]:
        """Token ids when they can be known, else the text itself."""
        if isinstance(prompt, list) or self.tokenizer is None:
            return prompt
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def _chat_text(self, messages: list[Any]) -> str:
        """The prompt a worker builds from the messages: its chat template's rendering when the
        tokenizer has one, else a plain rendering that keeps shared leading messages shared."""
        try:
            return render_chat(self.tokenizer, messages)
        except ValueError:  # the worker answers bad messages with its own 400; route as plain text
            return "".join(f"{m.get('role', '')}\n{_content_text(m.get('content'))}\n" for m in messages if isinstance(m, dict))


def _is_token_ids(value: Any) -> bool:
    """Whether `value` can be a prompt of token ids; anything else is left to the worker to refuse."""
    return isinstance(value, list) and bool(value) and all(
        type(t) is int and 0 <= t < _MAX_TOKEN_ID for t in value)


# Token ids are hashed as 64-bit integers (kvflock.shared.hashing); no vocabulary comes near.
_MAX_TOKEN_ID = 2**63


def _content_text(content: Any) -> str:
    """A message's text, whether it is a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
