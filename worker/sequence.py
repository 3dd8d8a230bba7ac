"""One sequence being generated: its tokens, its KV blocks and how far the model has read it.

A request with `n` completions owns `n` sequences. The scheduler moves sequences between
waiting and running; the engine appends sampled tokens and decides when one is finished.
"""

import enum
from dataclasses import dataclass, field

import torch

from kvfleet.worker.config import SamplingParams


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
class Sequence:
    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prefix caching: hashes of the sequence's full blocks, and how many of its blocks the
    # pool knows as cached.
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_preemptions: int = 0
    # Speculative decoding: tokens proposed to follow token_ids, checked by the next step;
    # the drafter's distribution at each of them ([len, vocab]), None for a point mass.
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def clear_draft(self) -> None:
        self.draft_token_ids = []
        self.draft_probs = None
