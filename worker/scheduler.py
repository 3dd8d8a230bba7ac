"""Continuous batching with chunked prefill under a per-step token budget.

Each step the scheduler first gives every running sequence its next tokens (one for a decode,
a chunk for a prefill still in progress), oldest first, then admits waiting sequences while
the token budget, `max_num_seqs` and free KV blocks allow. When blocks run out it preempts
the newest running sequence by recompute: its blocks are freed and it waits at the head of
the queue to be prefilled again (prompt plus the tokens it had generated). The output is a
plain list handed to the runner; the scheduler never touches tensors.

With prefix caching, a sequence that starts (or restarts) first takes the cached blocks of
its longest known prefix and skips computing them; every block it completes is registered,
so later sequences can share it.

With speculative decoding a decoding sequence may carry drafted tokens: the step then computes
its last token and the drafts together (budget and blocks counted), as far as the budget and
spare blocks allow (speculation never preempts anyone). Only the accepted drafts count as
computed afterwards (`on_draft_verified`); blocks that held nothing but rejected drafts go back
to the pool, and no block is registered for prefix caching before its tokens are accepted.

With async scheduling a sequence's last token may still be pending (sampled on the device,
its value unknown here, see kvflock.worker.sequence): it counts like any token, except that
no block is registered before its value is known, and a sequence whose pending tokens end it
(max_tokens) is not scheduled again. A sequence preempted with a pending token waits at least
one schedule, by which time its value has arrived, before it is prefilled again.
"""

from collections import deque
from dataclasses import dataclass

from kvflock.shared.hashing import hash_blocks
from kvflock.worker.kv.block_pool import BlockPool
from kvflock.worker.kv.tiers import OffloadTiers
from kvflock.worker.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    num_draft_tokens: int = 0  # of num_new_tokens, the drafts that follow the sequence's tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last token (and its drafts), so a new one
        is sampled (or the drafts verified)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens + self.num_draft_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True, tiers: OffloadTiers | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.tiers = tiers
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.awaits_only_pending:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            k = self._fit_draft(seq, n, budget, len(self.running) - i - 1) if seq.draft_token_ids else 0
            if not self._reserve(seq, n + k, preempted):
                break  # seq itself was the newest and got preempted
            scheduled.append(ScheduledSequence(seq, n + k, k))
            budget -= n + k
            i += 1

        # Admitting new work right after a preemption would only thrash the pool.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self._take_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._blocks_needed(seq, n)
            if not self.pool.can_allocate(need):
                self._release(seq)
                break
            if self.enable_prefix_caching:
                self.prefix_queried_tokens += seq.num_tokens
                self.prefix_hit_tokens += cached * self.block_size
            self.waiting.popleft()
            seq.block_table.extend(self.pool.allocate(need))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        return SchedulerOutput(scheduled, preempted)

    def _fit_draft(self, seq: Sequence, n: int, budget: int, num_behind: int) -> int:
        """Cut the sequence's draft to what this step can verify: only right after its last
        token, within the budget, and leaving a block for each running sequence behind it.
        Returns the drafts kept."""
        k = min(len(seq.draft_token_ids), budget - n)
        if n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens:
            k = 0
        if k > 0 and self._blocks_needed(seq, n + k) + num_behind > self.pool.num_free:
            k = 0
        if k == 0:
            seq.clear_draft()
        elif k < len(seq.draft_token_ids):
            seq.draft_token_ids = seq.draft_token_ids[:k]
            seq.draft_probs = None if seq.draft_probs is None else seq.draft_probs[:k]
        return k

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def _reserve(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Allocate seq's blocks for n more tokens, preempting the newest running sequences
        until they fit. False when seq itself had to be preempted."""
        need = self._blocks_needed(seq, n)
        while not self.pool.can_allocate(need):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def _take_cached_prefix(self, seq: Sequence) -> int:
        """Give a starting sequence the cached blocks of its prefix; returns how many. At least
        one token is always left to compute, for the logits of the next token."""
        if not self.enable_prefix_caching:
            return 0
        seq.block_hashes = hash_blocks(seq.token_ids, self.block_size, seq.block_hashes)
        usable = seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]
        seq.block_table = self.pool.take_cached(usable)
        if self.tiers is not None:
            self._restore_from_tiers(seq, usable[len(seq.block_table):])
        seq.num_cached_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return len(seq.block_table)

    def _restore_from_tiers(self, seq: Sequence, block_hashes: list[int]) -> None:
        """Continue the sequence's cached prefix with blocks copied back from CPU or disk."""
        assert self.tiers is not None
        wanted = []
        for h in block_hashes:
            if not self.tiers.contains(h) or not self.tiers.worth_restoring(h, self.block_size):
                break
            wanted.append(h)
        wanted = wanted[: self.pool.num_free]
        if not wanted:
            return
        self.tiers.pin(wanted)
        blocks = self.pool.allocate(len(wanted))
        restored = self.tiers.restore(wanted, blocks)
        for block, h in zip(blocks[:restored], wanted):
            self.pool.cache(block, h)
        seq.block_table.extend(blocks[:restored])
        self.pool.free(blocks[restored:][::-1])

    def on_step_done(self, batch: SchedulerOutput) -> None:
        """Record the tokens the model has just computed; register blocks they completed."""
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens - item.num_draft_tokens
            self._register_full_blocks(item.seq)

    def on_draft_verified(self, seq: Sequence, num_accepted: int) -> None:
        """After the accepted drafts (and the target's token after them) were appended: count
        their KV as computed, register the blocks they completed, and give back the blocks
        beyond the sequence's tokens, which only rejected drafts used."""
        seq.num_computed_tokens += num_accepted
        self._register_full_blocks(seq)
        needed = -(-seq.num_tokens // self.block_size)
        if len(seq.block_table) > needed:
            self.pool.free(seq.block_table[needed:][::-1])
            del seq.block_table[needed:]
        seq.clear_draft()

    def _register_full_blocks(self, seq: Sequence) -> None:
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        if full > seq.num_cached_blocks:
            seq.block_hashes = hash_blocks(seq.token_ids[: full * self.block_size], self.block_size, seq.block_hashes)
            for i in range(seq.num_cached_blocks, full):
                self.pool.cache(seq.block_table[i], seq.block_hashes[i])
            seq.num_cached_blocks = full

    def _release(self, seq: Sequence) -> None:
        """Give back a sequence's blocks, tail first, and forget what was computed."""
        self.pool.free(seq.block_table[::-1])
        seq.block_table = []
        seq.num_cached_blocks = 0
        seq.num_computed_tokens = 0
        seq.clear_draft()

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence, wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
