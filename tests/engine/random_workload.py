"""A random mix of arriving, aborted and finishing requests driven through an engine: the
workload behind the block-accounting checks (plain engine, speculative decoding)."""

import random
from collections.abc import Callable

from kvflock.worker.config import SamplingParams
from kvflock.worker.engine import LLMEngine, RequestOutput

NewRequest = Callable[[random.Random], tuple[list[int], SamplingParams]]


def run_random_workload(engine: LLMEngine, rng: random.Random, new_request: NewRequest, *, arrivals_until: int,
                        arrival_rate: float, abort_rate: float, max_steps: int,
                        on_output: Callable[[RequestOutput], None] | None = None) -> None:
    """For `arrivals_until` steps a request arrives with probability `arrival_rate` per step;
    each step a live request is aborted with probability `abort_rate`; runs until every request
    has ended or `max_steps` have passed."""
    live: set[str] = set()
    for step in range(max_steps):
        if step < arrivals_until and rng.random() < arrival_rate:
            rid = f"r{step}"
            engine.add_request(rid, *new_request(rng))
            live.add(rid)
        if live and rng.random() < abort_rate:
            rid = rng.choice(sorted(live))
            engine.abort_request(rid)
            live.discard(rid)
        for out in engine.step():
            if on_output is not None:
                on_output(out)
            if out.finished:
                live.discard(out.request_id)
        if step >= arrivals_until and not engine.has_unfinished_requests():
            break
