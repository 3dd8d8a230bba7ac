"""After any mix of finished, aborted and preempted requests every KV block is back in the pool."""

import random

import pytest

from kvflock.worker.config import SamplingParams
from tests.engine.random_workload import run_random_workload
from tests.tiny_models import VOCAB


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_block_returns_after_finish_abort_and_preemption(tiny_engine, seed, async_scheduling):
    rng = random.Random(seed)
    engine = tiny_engine(max_model_len=96, block_size=4, num_kv_blocks=30, max_num_batched_tokens=24,
                         async_scheduling=async_scheduling)

    def new_request(rng: random.Random) -> tuple[list[int], SamplingParams]:
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 40), n=rng.choice([1, 1, 2]))
        return prompt, params

    run_random_workload(engine, rng, new_request, arrivals_until=60, arrival_rate=0.4, abort_rate=0.1, max_steps=400)

    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.capacity
    assert all(engine.kv_manager.pool.ref_count(b) == 0 for b in range(engine.kv_manager.pool.num_blocks))
