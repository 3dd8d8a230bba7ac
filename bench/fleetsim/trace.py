"""Synthetic traces: sessions that arrive (Poisson, or bursty: the rate alternates between high and
low phases), each under one of a few shared system prompts (popularity skewed, as tenants are),
with one or more turns whose prompts extend the previous turn's prompt and answer, plus the
times at which replicas fail. Seeded: the same spec gives the same trace.

Token ids are drawn per session and turn, so a retried request carries the same tokens, and its
block hashes are computed with kvflock.shared.hashing exactly as the router and the workers do.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass, field

from kvflock.shared.hashing import hash_blocks



def _tokens(rng: random.Random, n: int) -> list[int]:
    """`n` random token ids below 2**16 (only equality of ids matters here; drawn as bytes, fast)."""
    return array("H", rng.randbytes(2 * n)).tolist()


@dataclass(frozen=True)
class TraceSpec:
    duration_s: float = 60.0
    sessions_per_s: float = 10.0
    bursty: bool = False  # rate x3 and x1/3 in alternating phases of `burst_period_s`
    burst_period_s: float = 10.0
    system_prompts: int = 32
    system_tokens: tuple[int, int] = (256, 2048)
    short_share: float = 0.7  # user turns of short_tokens, the others of long_tokens
    short_tokens: tuple[int, int] = (16, 256)
    long_tokens: tuple[int, int] = (1024, 6144)
    output_tokens: tuple[int, int] = (16, 384)
    mean_turns: float = 3.0  # turns per session, geometric
    max_context: int = 16_384  # a session ends before a turn's prompt and answer would exceed it
    think_s: tuple[float, float] = (1.0, 8.0)  # user's time between an answer and the next turn
    failures: tuple[float, ...] = ()  # times at which one replica (per `failure_share`) dies
    failure_share: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class Turn:
    user_tokens: int
    output_tokens: int
    think_s: float


@dataclass
class Session:
    id: int
    start: float
    system: int
    turns: list[Turn]
    tokens: list[int] = field(default_factory=list)  # the conversation so far
    hashes: list[int] = field(default_factory=list)  # its full blocks' hashes


class Trace:
    """The sessions of a spec, and the token ids and block hashes of each of their turns."""

    def __init__(self, spec: TraceSpec, block_size: int = 16) -> None:
        self.spec, self.block_size = spec, block_size
        rng = random.Random(spec.seed)
        self._system_tokens = [
            _tokens(rng, rng.randint(*spec.system_tokens)) for _ in range(spec.system_prompts)
        ]
        self._system_hashes: dict[int, list[int]] = {}
        weights = [1.0 / (i + 1) for i in range(spec.system_prompts)]  # Zipf: a few tenants dominate
        self.sessions: list[Session] = []
        t = 0.0
        while True:
            rate = spec.sessions_per_s
            if spec.bursty:
                rate *= 3.0 if int(t / spec.burst_period_s) % 2 == 0 else 1.0 / 3.0
            t += rng.expovariate(rate)
            if t >= spec.duration_s:
                break
            system = rng.choices(range(spec.system_prompts), weights)[0]
            turns: list[Turn] = []
            context = len(self._system_tokens[system])
            while True:
                lo_hi = spec.short_tokens if rng.random() < spec.short_share else spec.long_tokens
                turn = Turn(rng.randint(*lo_hi), rng.randint(*spec.output_tokens), rng.uniform(*spec.think_s))
                context += turn.user_tokens + turn.output_tokens
                if context > spec.max_context:
                    break
                turns.append(turn)
                if rng.random() < 1.0 / spec.mean_turns:
                    break
            if not turns:
                continue
            self.sessions.append(Session(len(self.sessions), t, system, turns))

    def prompt(self, session: Session, turn: int) -> tuple[int, tuple[int, ...]]:
        """Turn `turn`'s prompt length and block hashes (turns must be asked for in order: each
        extends the conversation with the previous answer and the new user message)."""
        rng = random.Random(f"{self.spec.seed}/{session.id}/{turn}")
        if turn == 0:
            session.tokens = list(self._system_tokens[session.system])
            if session.system not in self._system_hashes:
                self._system_hashes[session.system] = hash_blocks(session.tokens, self.block_size)
            session.hashes = list(self._system_hashes[session.system])
        else:
            answer = session.turns[turn - 1].output_tokens
            session.tokens += _tokens(rng, answer)
        session.tokens += _tokens(rng, session.turns[turn].user_tokens)
        session.hashes = hash_blocks(session.tokens, self.block_size, known=session.hashes)
        length, hashes = len(session.tokens), tuple(session.hashes)
        if turn == len(session.turns) - 1:  # the session ends: free its tokens
            session.tokens, session.hashes = [], []
        return length, hashes
