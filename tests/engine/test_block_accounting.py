"""After any mix of finished, aborted and preempted requests every KV block is back in the pool."""

import random

import pytest

from kvfleet.worker.config import SamplingParams
from tests.tiny_models import VOCAB


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_block_returns_after_finish_abort_and_preemption(tiny_engine, seed, async_scheduling):
    rng = random.Random(seed)
    engine = tiny_engine(max_model_len=96, block_size=4, num_kv_blocks=30, max_num_batched_tokens=24,
                         async_scheduling=async_scheduling)
    live: set[str] = set()
    for step in range(400):
        if step < 60 and rng.random() < 0.4:
            rid = f"r{step}"
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]
            params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 40), n=rng.choice([1, 1, 2]))
            engine.add_request(rid, prompt, params)
            live.add(rid)
        if live and rng.random() < 0.1:
            rid = rng.choice(sorted(live))
            engine.abort_request(rid)
            live.discard(rid)
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        if step >= 60 and not engine.has_unfinished_requests():
            break

    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_preemptions > 0
    assert engine.pool.num_free == engine.pool.capacity
    assert all(engine.pool.ref_count(b) == 0 for b in range(engine.pool.num_blocks))
