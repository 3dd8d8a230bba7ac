"""Choosing the next token of each sequence from its logits.

Order per row: penalties (repetition, frequency, presence), min_tokens masking, logit_bias, the
grammar's mask of a structured output (kvflock.worker.structured_output), then for non-greedy rows
temperature, top-k, top-p and min-p, then a draw. A row with a seed draws
from its own generator, so its output does not depend on what else is in the batch.
Logprobs are reported from the model's raw distribution, before any of the processing.

Everything runs on the device; `Sampler.sample` returns the tokens there (the next step may read
them without the host) with their copy to the host queued, and `SampledTokens.results` waits
for that copy: the step's one synchronization.
"""


import torch

from kvflock.worker.sequence import SampleResult, Sequence, TokenLogprobs
from kvflock.worker.structured_output import StepMasks, apply_token_bitmask
from kvflock.worker.transfer import HostCopy, to_device


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.int64, device)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt and output, frequency/presence over output.
    They read every token of the sequence, so none may be pending."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.has_penalties:
            assert not seq.num_pending_tokens, "penalties need the sequence's tokens on the host"
        if p.repetition_penalty != 1.0:
            seen = _ids(sorted(set(seq.token_ids)), logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and seq.output_token_ids:
            counts = torch.bincount(_ids(seq.output_token_ids, logits.device), minlength=logits.shape[1])
            counts = counts.to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> None:
    for row, seq in enumerate(seqs):
        # A grammar decides where its output may end: once complete, it allows nothing but EOS.
        if seq.num_output_tokens < seq.params.min_tokens and seq.grammar is None:
            banned = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(eos_token_ids))
            if banned:
                logits[row].index_fill_(0, _ids(sorted(banned), logits.device), float("-inf"))


def top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set every token outside the allowed set of each row to -inf. top_k 0 disables."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (a token is dropped when the mass
    # before it already does); the most likely token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p.unsqueeze(-1)) & (top_p.unsqueeze(-1) < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    sorted_logits = sorted_logits.masked_fill(probs < min_p.unsqueeze(-1) * probs[:, :1], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Add each row's logit_bias (token id -> bias) to its logits, in one scatter for the batch."""
    rows, tokens, biases = [], [], []
    for row, seq in enumerate(seqs):
        for token, bias in (seq.params.logit_bias or {}).items():
            rows.append(row)
            tokens.append(token)
            biases.append(bias)
    index = (_ids(rows, logits.device), _ids(tokens, logits.device))
    return logits.index_put_(index, to_device(biases, logits.dtype, logits.device), accumulate=True)


class SampledTokens:
    """One step's sampled tokens ([rows] on the device) and, for the rows that asked, their
    logprobs, with the copies to the host already queued."""

    def __init__(self, token_ids: torch.Tensor, seqs: list[Sequence], raw_logprobs: torch.Tensor | None) -> None:
        self.token_ids = token_ids
        self._logprob_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        self._num_top = [seqs[i].params.logprobs or 0 for i in self._logprob_rows]
        tensors = [token_ids]
        if raw_logprobs is not None and self._logprob_rows:
            index = _ids(self._logprob_rows, token_ids.device)
            rows = raw_logprobs[index]
            chosen = rows.gather(1, token_ids[index].unsqueeze(1)).squeeze(1)
            top_values, top_ids = rows.topk(max(self._num_top))
            tensors += [chosen, top_values, top_ids]
        self._copy = HostCopy(*tensors)

    def results(self) -> list[SampleResult]:
        """Waits for the step's tokens to reach the host."""
        host = self._copy.wait()
        tokens = host[0].tolist()
        results = [SampleResult(token, None) for token in tokens]
        if len(host) > 1:
            chosen, top_values, top_ids = (t.tolist() for t in host[1:])
            for j, (row, k) in enumerate(zip(self._logprob_rows, self._num_top)):
                top = dict(zip(top_ids[j][:k], top_values[j][:k]))
                results[row].logprobs = TokenLogprobs(tokens[row], chosen[j], top)
        return results


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], masks: StepMasks | None = None) -> list[SampleResult]:
        return self.sample(logits, seqs, masks).results()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], masks: StepMasks | None = None) -> SampledTokens:
        """The rows' tokens; `masks` restrict the rows of constrained sequences to their grammars."""
        logits = logits.float()
        raw_logprobs = logits.log_softmax(-1) if any(s.params.logprobs is not None for s in seqs) else None
        if any(s.params.has_penalties or s.num_output_tokens < s.params.min_tokens for s in seqs):
            logits = apply_penalties(logits.clone(), seqs)  # a copy: the caller's logits stay as they were
            _mask_stop_tokens(logits, seqs, self.eos_token_ids)
        if any(s.params.logit_bias for s in seqs):
            logits = apply_logit_bias(logits.clone(), seqs)  # a copy, as above
        if masks is not None:
            logits = apply_token_bitmask(logits, masks)

        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = _ids(sampled_rows, logits.device)
            params = [seqs[i].params for i in sampled_rows]
            settings = to_device([[p.temperature, p.top_k, p.top_p, p.min_p] for p in params], torch.float32,
                                 logits.device)
            filtered = top_k_top_p_min_p(
                logits[rows] / settings[:, 0].unsqueeze(-1),
                settings[:, 1].to(torch.int64), settings[:, 2], settings[:, 3],
            )
            probs = filtered.softmax(dim=-1)
            tokens[rows] = self._draw(probs, [seqs[i] for i in sampled_rows])
        return SampledTokens(tokens, seqs, raw_logprobs)

    def _draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row. Exponential race (argmax p/q, q ~ Exp(1)) equals a categorical
        draw and lets each seeded row use its own generator."""
        noise = torch.empty_like(probs)
        for row, seq in enumerate(seqs):
            noise[row].exponential_(generator=seq.generator or self.generator)
        return (probs / noise).argmax(dim=-1)
