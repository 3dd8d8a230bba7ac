"""Which drafted tokens a sequence keeps, given the target model's logits at every drafted
position, and what it emits instead of the first one it rejects.

Greedy: a draft is kept while it equals the target's argmax; the first that differs is replaced
by the target's token, and when all are kept the target's next token follows. The emitted
tokens are exactly those of plain greedy decoding.

Sampling: the speculative sampling rule (Leviathan et al., Chen et al., 2023). A draft `d`
with target probability p[d] and draft probability q[d] is kept with probability
min(1, p[d] / q[d]); the first rejected one is replaced by a draw from max(0, p - q),
normalised; when all are kept one more token is drawn from the target's next distribution.
Every emitted token then follows p exactly, whatever q is. A prompt-lookup draft has no
distribution: q is a point mass on the drafted token.
"""

from dataclasses import dataclass

import torch

from kvflock.worker.config import SamplingParams
from kvflock.worker.sampler import top_k_top_p_min_p


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution plain sampling draws from (temperature, top-k, top-p, min-p), for
    each row with its own parameters."""
    device = logits.device
    filtered = top_k_top_p_min_p(
        logits.float() / torch.tensor([p.temperature for p in params], device=device).unsqueeze(-1),
        torch.tensor([p.top_k for p in params], device=device),
        torch.tensor([p.top_p for p in params], device=device),
        torch.tensor([p.min_p for p in params], device=device),
    )
    return filtered.softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from unnormalised probabilities: the exponential race the sampler uses."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def accept_greedy(draft: list[int], target_tokens: list[int]) -> list[int]:
    """The emitted tokens; `target_tokens` holds the target's argmax at each of the
    len(draft) + 1 positions."""
    emitted = []
    for drafted, target in zip(draft, target_tokens):
        emitted.append(target)
        if drafted != target:
            return emitted
    emitted.append(target_tokens[len(draft)])
    return emitted


def accept_sampled(draft: list[int], p: torch.Tensor, q: torch.Tensor | None, generator: torch.Generator) -> list[int]:
    """The emitted tokens. `p` [len(draft) + 1, vocab]: the target's distribution at each
    position; `q` [len(draft), vocab]: the drafter's, None for point masses on the drafts."""
    k = len(draft)
    drafted = torch.tensor(draft, device=p.device).unsqueeze(1)
    p_drafted = p[:k].gather(1, drafted).squeeze(1)
    q_drafted = torch.ones_like(p_drafted) if q is None else q.gather(1, drafted).squeeze(1).to(p.dtype)
    uniform = torch.rand(k, generator=generator, device=p.device)
    kept = (uniform * q_drafted < p_drafted).tolist()  # u < p/q without dividing by a zero q
    accepted = kept.index(False) if False in kept else k
    if accepted == k:
        return draft + [draw(p[k], generator)]
    if q is None:
        residual = p[accepted].clone()
        residual[draft[accepted]] = 0.0
    else:
        residual = (p[accepted] - q[accepted].to(p.dtype)).clamp(min=0.0)
    if not bool(residual.sum() > 0):  # p == q up to rounding: rejection had probability ~0
        residual = p[accepted]
    return draft[:accepted] + [draw(residual, generator)]


@dataclass
class SpecDecodeStats:
    """Counters over every sequence step that verified drafts."""

    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verifications: int = 0

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafted_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        self.num_verifications += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_drafted_tokens if self.num_drafted_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a sequence gains per verifying step: the accepted drafts plus the target's own."""
        if not self.num_verifications:
            return 0.0
        return (self.num_accepted_tokens + self.num_verifications) / self.num_verifications
