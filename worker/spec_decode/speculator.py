"""The engine's side of speculative decoding: before a step, drafts for the decoding sequences
that can use them; after it, the tokens each sequence emits from the logits at its drafted
positions (kvflock.worker.spec_decode.verify), next to plain sampling for the others.

Sequences with repetition, frequency or presence penalties, with logprobs or a logit_bias, or
still short of their min_tokens are never drafted for: their processing depends on every token before, so
each position would need its own; they decode one token per step as before. Sequences with a
structured output are drafted for: the grammar's mask at each drafted position (the matcher
advanced over the drafts before it) rejects the drafts it refuses.
"""

import logging

import torch

from kvflock.worker.attention import select_attention_backend
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.model.loader import LoadedModel, load
from kvflock.worker.sampler import Sampler
from kvflock.worker.sequence import SampleResult, Sequence
from kvflock.worker.spec_decode.draft_model import DraftModelDrafter
from kvflock.worker.spec_decode.drafters import Drafter, NgramDrafter
from kvflock.worker.spec_decode.verify import SpecDecodeStats, accept_greedy, accept_sampled, target_probs
from kvflock.worker.step_plan import ScheduledSequence
from kvflock.worker.structured_output import StepMasks, apply_token_bitmask

log = logging.getLogger(__name__)


def can_draft(seq: Sequence) -> bool:
    p: SamplingParams = seq.params
    return (p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty
            and p.logprobs is None and not p.logit_bias and len(seq.output_token_ids) >= p.min_tokens)


class Speculator:
    """Proposes drafts for the scheduler to plan, and keeps the drafter's distributions at them
    for the verification, which reads the drafts the plan kept (a prefix of each proposal)."""

    def __init__(self, drafter: Drafter, num_speculative_tokens: int, sampler: Sampler) -> None:
        self.drafter = drafter
        self.num_speculative_tokens = num_speculative_tokens
        self.sampler = sampler
        self.stats = SpecDecodeStats()
        self._draft_probs: dict[int, torch.Tensor | None] = {}  # seq_id -> [len, vocab] of the last proposal

    def propose(self, running: list[Sequence], max_model_len: int) -> dict[int, list[int]]:
        """Drafts for the running sequences that decode next, by seq_id, as many as they can
        still use (never past max_tokens or max_model_len)."""
        self._draft_probs.clear()
        seqs, limits = [], []
        for seq in running:
            if seq.num_computed_tokens + 1 != seq.num_tokens or not can_draft(seq):
                continue
            limit = min(self.num_speculative_tokens, max_model_len - seq.num_tokens)
            if seq.params.max_tokens is not None:
                limit = min(limit, seq.params.max_tokens - len(seq.output_token_ids) - 1)
            if limit > 0:
                seqs.append(seq)
                limits.append(limit)
        if not seqs:
            return {}
        drafts = {}
        for seq, draft in zip(seqs, self.drafter.propose(seqs, limits)):
            drafts[seq.seq_id] = draft.token_ids
            self._draft_probs[seq.seq_id] = draft.probs
        return drafts

    def release(self, seq: Sequence) -> None:
        self.drafter.release(seq)

    def sample(self, logits: torch.Tensor, items: list[ScheduledSequence],
               masks: StepMasks | None = None) -> list[list[SampleResult]]:
        """The tokens each sampling item emits, in order: one sampled for a plain item; the
        accepted drafts and the target's next token for one that verified drafts. An item's
        logits rows are its 1 + num_draft_tokens consecutive rows; `masks` hold the grammar's
        allowed tokens at each row of a constrained item, so that a draft the grammar refuses is
        rejected like one the target would not have chosen."""
        rows: list[range] = []
        for item in items:
            start = rows[-1].stop if rows else 0
            rows.append(range(start, start + 1 + item.num_draft_tokens))
        emitted: list[list[SampleResult]] = [[] for _ in items]
        plain = [i for i, item in enumerate(items) if not item.num_draft_tokens]
        if plain:
            first_rows = [rows[i].start for i in plain]
            plain_masks = masks.select(first_rows) if masks is not None else None
            index = torch.tensor(first_rows, device=logits.device)
            for i, result in zip(plain, self.sampler(logits[index], [items[i].seq for i in plain], plain_masks)):
                emitted[i] = [result]
        if masks is not None:
            logits = apply_token_bitmask(logits, masks)

        drafted = [i for i, item in enumerate(items) if item.num_draft_tokens]
        argmax = logits.argmax(dim=-1).tolist()
        # The target distributions of every sampled (not greedy) item, in one pass.
        sampled = [i for i in drafted if not items[i].seq.params.greedy]
        sampled_rows = [r for i in sampled for r in rows[i]]
        probs = dict(zip(sampled_rows, target_probs(logits[sampled_rows], [items[i].seq.params for i in sampled
                                                                            for _ in rows[i]]))) if sampled else {}
        for i in drafted:
            seq, draft = items[i].seq, items[i].draft_token_ids
            if seq.params.greedy:
                tokens = accept_greedy(draft, [argmax[r] for r in rows[i]])
            else:
                p = torch.stack([probs[r] for r in rows[i]])
                q = self._draft_probs.get(seq.seq_id)
                q = None if q is None else q[:len(draft)]
                tokens = accept_sampled(draft, p, q, seq.generator or self.sampler.generator)
            self.stats.record(items[i].num_draft_tokens, len(tokens) - 1)
            emitted[i] = [SampleResult(t, None) for t in tokens]
        return emitted


def load_draft_model(config: EngineConfig, target: LoadedModel, max_model_len: int,
                     loaded: LoadedModel | None = None) -> LoadedModel | None:
    """The draft model of speculative_method="draft" (None otherwise), in the target's dtype and
    on its device (rank 0's under tensor parallelism), checked against the target. `loaded`:
    one loaded already (tests share one)."""
    if config.speculative_method != "draft":
        return None
    assert config.draft_model is not None
    if loaded is None:
        dtype = str(target.dtype).removeprefix("torch.")
        draft_config = EngineConfig(model=config.draft_model, dtype=dtype, device=str(target.device), seed=config.seed)
        loaded = load(draft_config, select_attention_backend(target.device))
    _check_draft(loaded, target, max_model_len)
    return loaded


def make_speculator(config: EngineConfig, num_blocks: int, sampler: Sampler,
                    draft: LoadedModel | None = None) -> Speculator | None:
    """The configured speculator, None when speculative decoding is off. The draft model's pool
    has as many blocks as the target's (the engine sizes both together)."""
    if config.speculative_method is None:
        return None
    if config.speculative_method == "ngram":
        drafter: Drafter = NgramDrafter(config.prompt_lookup_min, config.prompt_lookup_max)
    else:
        assert draft is not None
        drafter = DraftModelDrafter(draft, num_blocks, config.block_size, config.max_num_batched_tokens,
                                    sampler.generator)
    log.info("speculative decoding: %s, %d tokens per step", config.speculative_method, config.num_speculative_tokens)
    return Speculator(drafter, config.num_speculative_tokens, sampler)


def _check_draft(draft: LoadedModel, target: LoadedModel, max_model_len: int) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft_model: its vocabulary of {draft.config.vocab_size} tokens differs from the target's "
                         f"{target.config.vocab_size}; use a draft model with the target's tokenizer")
    if draft.config.max_position_embeddings < max_model_len:
        raise ValueError(f"draft_model: its context of {draft.config.max_position_embeddings} tokens is shorter than "
                         f"max_model_len={max_model_len}; lower max_model_len")
    if draft.device != target.device:
        raise ValueError(f"draft_model: loaded on {draft.device}, the target runs on {target.device}")
