"""The draft-model drafter: a small model with the target's vocabulary proposes the next tokens
autoregressively, over its own paged KV cache, whose blocks its own KV cache manager keeps (no prefix caching).

Each sequence has a mirror here: the sequence's tokens, the drafts last proposed after them,
and the draft model's blocks. Before proposing, a mirror keeps the KV of the tokens the target
accepted and recomputes from the first rejected draft on; a new mirror first reads the whole
sequence (chunked under `max_num_batched_tokens`). A sequence whose blocks do not fit in the
pool gets no draft this step, which is always safe.
"""

from dataclasses import dataclass

import torch

from kvflock.worker.kv.manager import KVCacheManager
from kvflock.worker.model.loader import LoadedModel
from kvflock.worker.runner import ModelRunner, allocate_kv_cache
from kvflock.worker.sequence import Sequence, SequenceStatus
from kvflock.worker.spec_decode.drafters import Draft
from kvflock.worker.spec_decode.verify import draw, target_probs
from kvflock.worker.step_plan import ScheduledSequence, StepPlan


@dataclass
class _Mirror:
    seq: Sequence  # the target's sequence
    kv: Sequence  # the draft model's view: its tokens, computed KV and blocks
    synced_len: int = 0  # how many of kv's tokens are known to be the sequence's own


class DraftModelDrafter:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, max_num_batched_tokens: int,
                 generator: torch.Generator) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.generator = generator  # for sequences without a seed of their own
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        kv_cache = allocate_kv_cache(loaded.config, num_blocks, block_size, loaded.dtype, loaded.device)
        self.runner = ModelRunner(loaded.model, kv_cache, block_size)
        self._mirrors: dict[int, _Mirror] = {}

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Draft]:
        self._release_idle()
        mirrors: list[Sequence | None] = [self._sync(seq) for seq in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        logits = self._catch_up(mirrors)
        for round_ in range(max(max_tokens, default=0)):
            if round_ > 0:
                logits = self._feed_last([i for i in logits if round_ < max_tokens[i]], mirrors)
            logits = {i: row for i, row in logits.items() if round_ < max_tokens[i]}
            if not logits:
                break
            self._sample(logits, seqs, mirrors, probs)
        return [
            Draft(mirror.token_ids[seq.num_tokens:], torch.stack(p) if p else None) if mirror else Draft([])
            for seq, mirror, p in zip(seqs, mirrors, probs)
        ]

    def release(self, seq: Sequence) -> None:
        mirror = self._mirrors.pop(seq.seq_id, None)
        if mirror is not None:
            self.kv.free(mirror.kv)

    # -- mirrors ------------------------------------------------------------------------

    def _release_idle(self) -> None:
        """Free the mirrors of sequences not running now (preempted ones), so that the pool
        serves those that are."""
        for mirror in list(self._mirrors.values()):
            if mirror.seq.status is not SequenceStatus.RUNNING:
                self.release(mirror.seq)

    def _sync(self, seq: Sequence) -> Sequence:
        """The sequence's view in the draft model, its tokens set to the sequence's and its
        computed KV cut to the prefix that it still shares with them (the accepted drafts)."""
        mirror = self._mirrors.get(seq.seq_id)
        if mirror is None:
            kv = Sequence(seq.seq_id, seq.request_id, seq.index, [], seq.params)
            mirror = self._mirrors[seq.seq_id] = _Mirror(seq, kv)
        kv, shared = mirror.kv, mirror.synced_len
        limit = min(kv.num_tokens, seq.num_tokens)
        while shared < limit and kv.token_ids[shared] == seq.token_ids[shared]:
            shared += 1
        kv.token_ids = list(seq.token_ids)
        kv.num_computed_tokens = min(kv.num_computed_tokens, shared, seq.num_tokens - 1)
        mirror.synced_len = seq.num_tokens
        return kv

    # -- forward passes -----------------------------------------------------------------

    def _catch_up(self, mirrors: list[Sequence | None]) -> dict[int, torch.Tensor]:
        """Run every mirror up to its last token, in chunks under the token budget: the logits
        after each one's last token, by index. A mirror that does not fit becomes None."""
        logits: dict[int, torch.Tensor] = {}
        pending = [i for i, kv in enumerate(mirrors) if kv is not None]
        while pending:
            budget, items, order = self.max_num_batched_tokens, [], []
            for i in pending:
                kv = mirrors[i]
                assert kv is not None
                n = min(kv.num_tokens - kv.num_computed_tokens, budget)
                if n == 0:
                    break  # the budget is spent; the rest goes in the next chunk
                if not self.kv.allocate(kv, n):
                    mirrors[i] = None
                    continue
                items.append(ScheduledSequence.of(kv, n, self.kv.block_ids(kv)))
                order.append(i)
                budget -= n
            if not items:
                break
            logits.update(self._run(items, order))
            pending = [i for i in pending if mirrors[i] is not None and i not in logits]
        return logits

    def _feed_last(self, indices: list[int], mirrors: list[Sequence | None]) -> dict[int, torch.Tensor]:
        """Feed each mirror its last drafted token; those that fit in the pool get logits."""
        items, order = [], []
        for i in indices:
            kv = mirrors[i]
            assert kv is not None
            if self.kv.allocate(kv, 1):
                items.append(ScheduledSequence.of(kv, 1, self.kv.block_ids(kv)))
                order.append(i)
        return self._run(items, order) if items else {}

    def _run(self, items: list[ScheduledSequence], order: list[int]) -> dict[int, torch.Tensor]:
        sampling = [i for item, i in zip(items, order) if item.samples]
        logits = self.runner.execute(StepPlan(items))
        for item in items:
            item.seq.num_computed_tokens += item.num_new_tokens
        return dict(zip(sampling, logits))

    def _sample(self, logits: dict[int, torch.Tensor], seqs: list[Sequence], mirrors: list[Sequence | None],
                probs: list[list[torch.Tensor]]) -> None:
        """Append one drafted token to each mirror that has logits; keep the distribution it
        was drawn from for the rejection rule (greedy drafts need none)."""
        indices = list(logits)
        rows = torch.stack([logits[i] for i in indices])
        tokens = rows.argmax(dim=-1).tolist()
        sampled = [n for n, i in enumerate(indices) if not seqs[i].params.greedy]
        if sampled:
            q = target_probs(rows[sampled], [seqs[indices[n]].params for n in sampled])
            for row, n in enumerate(sampled):
                seq = seqs[indices[n]]
                tokens[n] = draw(q[row], seq.generator or self.generator)
                probs[indices[n]].append(q[row])
        for i, token in zip(indices, tokens):
            kv = mirrors[i]
            assert kv is not None
            kv.token_ids.append(token)
