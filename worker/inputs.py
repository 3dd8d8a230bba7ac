"""A request's prompt checked and turned into token ids, before the engine accepts it: bad input
is refused with a ValueError naming the field. Used only on the engine's thread, so its
tokenizer is never shared with another thread."""

from dataclasses import dataclass
from typing import Any

from kvflock.worker.config import SamplingParams


@dataclass
class Prompt:
    text: str | None  # None when the request gave token ids
    token_ids: list[int]


class InputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def tokenize(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids instead of text")
            return Prompt(prompt, self.tokenizer.encode(prompt, add_special_tokens=False))
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt: token ids must be integers in [0, {self.vocab_size}); got {bad[:3]}")
        return Prompt(None, ids)

    def process(self, prompt: str | list[int], params: SamplingParams) -> Prompt:
        """The prompt as token ids, refused when it leaves no room for what `params` ask."""
        tokenized = self.tokenize(prompt)
        outside = [t for t in params.logit_bias or {} if t >= self.vocab_size]
        if outside:
            raise ValueError(f"logit_bias: token ids must be below the vocabulary size {self.vocab_size}; got {outside[:3]}")
        n = len(tokenized.token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt: {n} tokens leave no room to generate within max_model_len={self.max_model_len}")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens: {params.max_tokens} new tokens after a prompt of {n} exceed "
                f"max_model_len={self.max_model_len}; ask for at most {self.max_model_len - n}"
            )
        return tokenized
