"""A step's plan: what the scheduler hands to the engine and the runner, as plain data.

Per scheduled sequence it names the tokens to compute, the drafts to verify and the block
ids, copied when the step is planned: the scheduler advances its sequences right after
planning (and with async scheduling plans the next step before this one has run), so the
runner never reads a sequence's live fields. It also names the KV transfers that must run
before the forward pass: blocks evicted from the GPU pool whose content goes down to the CPU
and disk tiers, and blocks to fill from those tiers.
"""

from dataclasses import dataclass, field

from kvflock.worker.sequence import Sequence


@dataclass(slots=True)  # not frozen: one is made per sequence and step, and frozen ones build slower
class ScheduledSequence:
    """One sequence's share of a step. `seq` says whom the step is for (the sampler reads its
    parameters, the post-step update advances it); the runner reads only the other fields."""

    seq: Sequence
    start: int  # position of the first token computed
    token_ids: list[int]  # the sequence's tokens to compute; may hold placeholders (pending tokens)
    draft_token_ids: list[int]  # drafts that follow token_ids, verified by this step
    block_ids: list[int]  # the sequence's block table
    samples: bool  # the step reaches the sequence's last token: it samples a new one (or verifies the drafts)
    num_new_tokens: int  # tokens this step computes for the sequence, drafts included (the runner reads it often)
    lora_slot: int = -1  # its adapter's device slot, set by the engine after planning; -1: none

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int, block_ids: list[int],
           draft_token_ids: list[int] | None = None) -> "ScheduledSequence":
        """The next `num_tokens` of `seq` after its computed ones, then the drafts."""
        start = seq.num_computed_tokens
        end = start + num_tokens
        drafts = draft_token_ids or []
        return cls(seq, start, seq.token_ids[start:end], drafts, block_ids, end == seq.num_tokens,
                   num_tokens + len(drafts))

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft_token_ids)


@dataclass(frozen=True, eq=False)
class BlockRestore:
    """Copy the blocks of `block_hashes` from the CPU or disk tier into `block_ids`, in order,
    for `seq`'s cached prefix."""

    seq: Sequence
    block_hashes: list[int]
    block_ids: list[int]


@dataclass
class KVTransfers:
    """Copies to make before the step's forward pass, offloads first: a restore may fill a block
    whose evicted content is still to be copied down."""

    offloads: list[tuple[int, int]] = field(default_factory=list)  # (block id, block hash) evicted from the GPU pool
    restores: list[BlockRestore] = field(default_factory=list)

    @property
    def restored_hashes(self) -> list[int]:
        return [h for restore in self.restores for h in restore.block_hashes]


@dataclass
class StepPlan:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence] = field(default_factory=list)
    kv_transfers: KVTransfers = field(default_factory=KVTransfers)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def sampling(self) -> list[ScheduledSequence]:
        """The items that sample, in the order of the logits' rows."""
        return [item for item in self.scheduled if item.samples]

    def without(self, seq_ids: set[int]) -> "StepPlan":
        """The plan with those sequences taken out of the step (their transfers stay)."""
        kept = [item for item in self.scheduled if item.seq.seq_id not in seq_ids]
        return StepPlan(kept, self.preempted, self.kv_transfers)
