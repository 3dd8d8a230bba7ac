"""Drafters propose the tokens that probably follow a sequence, for the target model to verify
in one step. This module holds their common interface and prompt lookup (n-gram matching
over the sequence's own tokens, no extra model); kvflock.worker.spec_decode.draft_model holds
the drafter that runs a small model.
"""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvflock.worker.sequence import Sequence


@dataclass
class Draft:
    token_ids: list[int]
    # The drafter's distribution at each drafted position [len, vocab]; None: point masses.
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Draft]:
        """Up to max_tokens[i] tokens to follow seqs[i].token_ids, for each sequence."""
        ...

    def release(self, seq: Sequence) -> None:
        """Forget what is kept for a sequence that has finished."""
        ...


@dataclass
class NgramIndex:
    """Where each n-gram of one token list last occurred with a token after it; grows
    incrementally as the list does (token lists only ever get longer)."""

    min_n: int
    max_n: int
    num_indexed: int = 0  # n-grams ending before this position are indexed
    last_start: dict[tuple[int, ...], int] = field(default_factory=dict)

    def extend(self, tokens: list[int]) -> None:
        # An n-gram is indexed once a token follows it: the sequence's current suffix is the
        # query, and must not find itself.
        for end in range(max(self.num_indexed, self.min_n), len(tokens)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.last_start[tuple(tokens[end - n:end])] = end - n
        self.num_indexed = max(self.num_indexed, len(tokens))

    def continuation(self, tokens: list[int], k: int) -> list[int]:
        """The k tokens that followed the latest earlier occurrence of the longest matching
        suffix (max_n down to min_n); empty when none matches."""
        self.extend(tokens)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            start = self.last_start.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start + n:start + n + k]
        return []


class NgramDrafter:
    """Prompt lookup: drafts copied from the sequence's prompt and output. Pays off when the
    output repeats its input (summaries, edits, code changes); costs nothing when it finds
    no match."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[int, NgramIndex] = {}

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Draft]:
        drafts = []
        for seq, k in zip(seqs, max_tokens):
            index = self._indexes.setdefault(seq.seq_id, NgramIndex(self.min_n, self.max_n))
            drafts.append(Draft(index.continuation(seq.token_ids, k)))
        return drafts

    def release(self, seq: Sequence) -> None:
        self._indexes.pop(seq.seq_id, None)
