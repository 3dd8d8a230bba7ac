"""Continuous batching with chunked prefill under a per-step token budget.

Each step the scheduler first gives every running sequence its next tokens (one for a decode,
a chunk for a prefill still in progress), oldest first, then admits waiting sequences while
the token budget, `max_num_seqs` and free KV blocks allow. When blocks run out it preempts
the newest running sequence by recompute: its blocks are freed and it waits at the head of
the queue to be prefilled again (prompt plus the tokens it had generated). Blocks, prefixes
and transfers between the KV tiers are the KV cache manager's (kvflock.worker.kv.manager):
the scheduler asks it, and hands the runner a plain step plan (kvflock.worker.step_plan). It
imports no torch and does no I/O.

A planned step counts as computed at once (the plan holds copies of what the runner reads),
so the next step can be planned before this one has run. After the step, `update` is the one
place that applies its outcome: it appends the emitted tokens, applies the stop conditions,
counts accepted drafts, registers completed blocks and frees finished sequences.

With prefix caching, a sequence that starts (or restarts) first takes the cached blocks of
its longest known prefix and skips computing them; every block it completes is registered,
so later sequences can share it.

With speculative decoding a decoding sequence may come with drafted tokens: the step then
computes its last token and the drafts together (budget and blocks counted), as far as the
budget and spare blocks allow (speculation never preempts anyone). Only the accepted drafts
count as computed afterwards; blocks that held nothing but rejected drafts go back to the
pool, and no block is registered for prefix caching before its tokens are accepted.

With async scheduling a sequence's last token may still be pending (sampled on the device,
its value unknown here, see kvflock.worker.sequence): it counts like any token, except that
no block is registered before its value is known, and a sequence whose pending tokens end it
(max_tokens) is not scheduled again. A sequence preempted with a pending token waits at least
one schedule, by which time its value has arrived, before it is prefilled again.

With LoRA adapters, the running sequences use at most `max_loras` adapters between them (the
device slots hold that many): a waiting sequence whose adapter would be one more waits, and
the queue behind it too (first come, first served).
"""

import logging
from collections import deque
from collections.abc import Callable

from kvflock.worker.kv.manager import KVCacheManager
from kvflock.worker.sequence import SampleResult, Sequence, SequenceStatus
from kvflock.worker.step_plan import ScheduledSequence, StepPlan

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int | None = None) -> None:
        self.kv = kv
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, drafts: dict[int, list[int]] | None = None) -> StepPlan:
        """Plan the next step. `drafts`: proposed tokens to follow each decoding sequence, by
        seq_id; the plan keeps what the step can verify."""
        drafts = drafts or {}
        budget = self.max_num_batched_tokens
        planned: list[tuple[Sequence, int, list[int]]] = []  # sequence, its tokens to compute, its drafts
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.awaits_only_pending:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            draft = self._fit_draft(seq, drafts.get(seq.seq_id, []), n, budget, len(self.running) - i - 1)
            if not self._reserve(seq, n + len(draft), preempted):
                break  # seq itself was the newest and got preempted
            planned.append((seq, n, draft))
            budget -= n + len(draft)
            i += 1

        # Admitting new work right after a preemption would only thrash the pool.
        adapters = {s.lora_name for s in self.running if s.lora_name is not None}
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._adapter_fits(seq, adapters):
                break
            cached = self.kv.start(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate(seq, n):
                self.kv.free(seq)
                break
            if self.kv.enable_prefix_caching:
                self.prefix_queried_tokens += seq.num_tokens
                self.prefix_hit_tokens += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            planned.append((seq, n, []))
            budget -= n

        scheduled = [ScheduledSequence.of(seq, n, self.kv.block_ids(seq), draft) for seq, n, draft in planned]
        for seq, n, _ in planned:
            seq.num_computed_tokens += n  # the drafts count once they are accepted, in update()
        return StepPlan(scheduled, preempted, self.kv.take_transfers())

    def _adapter_fits(self, seq: Sequence, adapters: set[str]) -> bool:
        """Whether seq's adapter may join the running ones (it is added to them if so)."""
        if seq.lora_name is None or seq.lora_name in adapters:
            return True
        if self.max_loras is not None and len(adapters) >= self.max_loras:
            return False
        adapters.add(seq.lora_name)
        return True

    def _fit_draft(self, seq: Sequence, draft: list[int], n: int, budget: int, num_behind: int) -> list[int]:
        """The part of the sequence's draft this step can verify: only right after its last
        token, within the budget, and leaving a block for each running sequence behind it."""
        if not draft or n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens:
            return []
        k = min(len(draft), budget - n)
        if k > 0 and not self.kv.can_fit(seq, n + k, blocks_to_spare=num_behind):
            return []
        return draft[:k]

    def _reserve(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Allocate seq's blocks for n more tokens, preempting the newest running sequences
        until they fit. False when seq itself had to be preempted."""
        while not self.kv.allocate(seq, n):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def on_kv_restored(self, plan: StepPlan, num_restored: list[int]) -> StepPlan:
        """After the plan's restores ran (`num_restored[i]` blocks of the i-th): a sequence whose
        restore fell short leaves this step and computes the missing blocks from the next one."""
        short = set()
        for restore, n in zip(plan.kv_transfers.restores, num_restored):
            if not self.kv.restore_done(restore, n):
                self.prefix_hit_tokens -= (len(restore.block_ids) - n) * self.kv.block_size
                short.add(restore.seq.seq_id)
        return plan.without(short) if short else plan

    def update(self, plan: StepPlan, emitted: list[list[SampleResult]],
               check_stop: Callable[[Sequence], None]) -> list[Sequence]:
        """Apply a step's outcome, once its tokens are on the host: `emitted[i]` holds the tokens
        of the plan's i-th sampling item (one sampled; or the accepted drafts and the target's
        next token). Appends them, calling `check_stop` after each (it sets finish_reason; a stop
        drops the tokens after it), counts accepted drafts as computed, gives back the blocks of
        rejected ones, registers completed blocks and frees finished sequences. A sequence whose
        stop check raises ends with finish_reason "error". Returns the sequences that progressed."""
        progressed = []
        for item, results in zip(plan.sampling, emitted):
            seq = item.seq
            if seq.is_finished:  # aborted, or ended by the step before while this one ran
                continue
            try:
                for result in results:
                    seq.append_token(result.token_id)
                    if result.logprobs is not None:
                        seq.logprobs.append(result.logprobs)
                    check_stop(seq)
                    if seq.finish_reason is not None:
                        break
            except Exception:
                log.exception("request %s failed while finishing its step", seq.request_id)
                seq.finish_reason = "error"
            if seq.finish_reason is None and item.num_draft_tokens:
                seq.num_computed_tokens += len(results) - 1
                self.kv.trim(seq)
            self.kv.register_full_blocks(seq)  # a finished sequence's blocks stay findable once freed
            if seq.finish_reason is not None:
                self.finish(seq)
            progressed.append(seq)
        for item in plan.scheduled:
            if not item.samples and not item.seq.is_finished:
                self.kv.register_full_blocks(item.seq)
        return progressed

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence, wherever it is; its pending tokens are dropped."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.drop_pending()
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
