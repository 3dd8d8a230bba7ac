"""One sequence being generated: its tokens, its KV blocks and how far the model has read it.

A request with `n` completions owns `n` sequences. The scheduler moves sequences between
waiting and running and appends the tokens each step emits; the KV cache manager
(kvflock.worker.kv.manager) holds their blocks.

With async scheduling a sequence is scheduled again before the host knows the token its last
step sampled: that token is pending, and `token_ids` ends with a placeholder for it (a
negative number that tells the runner which row of that step's sampled tokens, still on the
device, to read). `append_token` fills the oldest placeholder once the value arrives.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the config stay out of the torch-free scheduler's imports
    import torch

    from kvflock.worker.config import SamplingParams
    from kvflock.worker.structured_output import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability and the top alternatives' (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass
class SampleResult:
    """One token a step emitted for a sequence, with its logprobs when they were asked for."""

    token_id: int
    logprobs: TokenLogprobs | None


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is computed, or queued to be by a launched step
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_preemptions: int = 0
    num_pending_tokens: int = 0
    grammar: GrammarMatcher | None = None  # where its output is in its structured output's grammar
    lora_name: str | None = None  # the adapter it runs with (kvflock.worker.lora); None: the base model
    block_hash_root: int | None = None  # what its first KV block hashes from (its adapter's weights)

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the host knows: all but the pending ones."""
        return len(self.token_ids) - self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far, pending ones included."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def awaits_only_pending(self) -> bool:
        """Its pending tokens reach max_tokens: once they arrive it is finished, so scheduling
        it again would compute a token nobody reads."""
        return (self.num_pending_tokens > 0 and self.params.max_tokens is not None
                and self.num_output_tokens >= self.params.max_tokens)

    def append_token(self, token_id: int) -> None:
        """The next token's value: it replaces the oldest placeholder, if any."""
        self.output_token_ids.append(token_id)
        if self.num_pending_tokens:
            self.token_ids[self.num_known_tokens] = token_id
            self.num_pending_tokens -= 1
        else:
            self.token_ids.append(token_id)

    def append_pending(self, row: int) -> None:
        """A token sampled into `row` of a step's sampled tokens, its value still on the device."""
        self.token_ids.append(-1 - row)
        self.num_pending_tokens += 1

    def drop_pending(self) -> None:
        """Forget the pending tokens (the sequence finished before they arrived)."""
        del self.token_ids[self.num_known_tokens:]
        self.num_pending_tokens = 0
