"""Choosing the next token of each sequence from its logits.

Order per row: penalties (repetition, frequency, presence), min_tokens masking, then for
non-greedy rows temperature, top-k, top-p and min-p, then a draw. A row with a seed draws
from its own generator, so its output does not depend on what else is in the batch.
Logprobs are reported from the model's raw distribution, before any of the processing.
"""

from dataclasses import dataclass

import torch

from kvfleet.worker.sequence import Sequence, TokenLogprobs


@dataclass
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt and output, frequency/presence over output."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and seq.output_token_ids:
            out = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> None:
    for row, seq in enumerate(seqs):
        if len(seq.output_token_ids) < seq.params.min_tokens:
            banned = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(eos_token_ids))
            if banned:
                logits[row, sorted(banned)] = float("-inf")


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


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        logits = logits.float()
        raw_logprobs = logits.log_softmax(-1) if any(s.params.logprobs is not None for s in seqs) else None
        logits = apply_penalties(logits.clone(), seqs)
        _mask_stop_tokens(logits, seqs, self.eos_token_ids)

        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            params = [seqs[i].params for i in sampled_rows]
            temps = torch.tensor([p.temperature for p in params], device=logits.device)
            filtered = top_k_top_p_min_p(
                logits[rows] / temps.unsqueeze(-1),
                torch.tensor([p.top_k for p in params], device=logits.device),
                torch.tensor([p.top_p for p in params], device=logits.device),
                torch.tensor([p.min_p for p in params], device=logits.device),
            )
            probs = filtered.softmax(dim=-1)
            tokens[rows] = self._draw(probs, [seqs[i] for i in sampled_rows])

        token_list = tokens.tolist()
        results = []
        for row, (seq, token) in enumerate(zip(seqs, token_list)):
            lp = None
            if raw_logprobs is not None and seq.params.logprobs is not None:
                top_vals, top_ids = raw_logprobs[row].topk(seq.params.logprobs)
                lp = TokenLogprobs(token, float(raw_logprobs[row, token]), dict(zip(top_ids.tolist(), top_vals.tolist())))
            results.append(SampleResult(token, lp))
        return results

    def _draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row. Exponential race (argmax p/q, q ~ Exp(1)) equals a categorical
        draw and lets each seeded row use its own generator."""
        noise = torch.empty_like(probs)
        for row, seq in enumerate(seqs):
            noise[row].exponential_(generator=seq.generator or self.generator)
        return (probs / noise).argmax(dim=-1)
