"""Async scheduling (each step launched before the previous one's tokens reach the host) gives
the outputs of completing one step at a time: greedy and seeded sampling, logprobs, penalties,
min_tokens, stop strings and n > 1, under chunked prefill and preemption. It runs on CPU here
(the overlap itself only pays on a GPU), which exercises the same bookkeeping."""

import random

import pytest
from pydantic import ValidationError

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine, RequestOutput
from tests.tiny_models import VOCAB

LIMITS = dict(max_model_len=96, block_size=4, num_kv_blocks=40, max_num_batched_tokens=24)


def _mixed_workload(seed: int, vocab: int = VOCAB) -> list[tuple[str, list[int], SamplingParams]]:
    """Requests whose outputs do not depend on what else runs: greedy or seeded."""
    rng = random.Random(seed)
    choices = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=20, seed=rng.randrange(1000)),
        dict(temperature=1.0, top_p=0.9, n=2, seed=rng.randrange(1000)),
        dict(temperature=0.0, logprobs=3),
        dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
        dict(temperature=0.0, min_tokens=6),
        dict(temperature=0.7, presence_penalty=0.8, seed=rng.randrange(1000)),
    ]
    workload = []
    for i in range(24):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(max_tokens=rng.randint(1, 30), **rng.choice(choices))
        workload.append((f"r{i}", prompt, params))
    return workload


def _run(engine: LLMEngine, workload: list[tuple[str, list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    """Add the requests a few at a time between steps, step until all are done."""
    done: dict[str, RequestOutput] = {}
    pending = list(workload)
    while pending or engine.has_unfinished_requests():
        for request_id, prompt, params in pending[:3]:
            engine.add_request(request_id, prompt, params)
        del pending[:3]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _completions(out: RequestOutput) -> list[tuple]:
    """Tokens, text, finish and the logprobs' token ids: equal in both runs."""
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
             [(lp.token_id, sorted(lp.top)) for lp in c.logprobs or []]) for c in out.outputs]


def _logprob_values(out: RequestOutput) -> list[float]:
    """Equal to 1e-4: the two runs batch requests differently, so float32 sums round differently."""
    return [v for c in out.outputs for lp in c.logprobs or [] for v in (lp.logprob, *lp.top.values())]


def _assert_same_outputs(sync: LLMEngine, overlapped: LLMEngine,
                         workload: list[tuple[str, list[int], SamplingParams]]) -> None:
    assert overlapped.async_scheduling and not sync.async_scheduling
    expected, got = _run(sync, workload), _run(overlapped, workload)
    assert sorted(got) == sorted(expected) == sorted(r for r, _, _ in workload)
    for request_id in expected:
        assert _completions(got[request_id]) == _completions(expected[request_id]), request_id
        assert _logprob_values(got[request_id]) == pytest.approx(_logprob_values(expected[request_id]), abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_async_outputs_equal_step_at_a_time_outputs(tiny_engine, seed):
    overlapped = tiny_engine(async_scheduling=True, **LIMITS)
    _assert_same_outputs(tiny_engine(async_scheduling=False, **LIMITS), overlapped, _mixed_workload(seed))
    assert overlapped.scheduler.num_preemptions > 0, "the pool must be small enough to preempt"
    assert overlapped.kv_manager.pool.num_free == overlapped.kv_manager.pool.capacity


def test_stop_strings_end_requests_at_the_same_token(smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=[" the", "."])
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    outputs = []
    for async_scheduling in (False, True):
        engine = LLMEngine(EngineConfig(model="demo", max_model_len=256, async_scheduling=async_scheduling),
                           loaded=smollm2)
        done = _run(engine, [(f"p{i}", p, params) for i, p in enumerate(prompts)])
        outputs.append({r: _completions(o) for r, o in done.items()})
    assert outputs[0] == outputs[1]
    assert any(c[0][2] == "stop" for c in outputs[1].values())


def test_a_request_ended_by_max_tokens_costs_no_extra_step(tiny_engine):
    engine = tiny_engine(async_scheduling=True, max_model_len=64)
    tokens_per_step: list[int] = []
    execute = engine.runner.execute

    def counting_execute(batch, pending=None):
        tokens_per_step.append(batch.num_tokens)
        return execute(batch, pending)

    engine.runner.execute = counting_execute
    engine.add_request("r", [1, 2, 3, 4, 5], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()

    assert tokens_per_step == [5, 1, 1, 1]  # the prefill samples the first token, three decodes the rest


def test_abort_while_a_step_is_in_flight_keeps_the_others_and_frees_every_block(tiny_engine):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = {"a": [1, 2, 3], "b": [4, 5, 6, 7], "c": [8, 9]}
    reference = tiny_engine(async_scheduling=False, max_model_len=64)
    expected = _run(reference, [(r, p, params) for r, p in prompts.items()])

    engine = tiny_engine(async_scheduling=True, max_model_len=64)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    done: dict[str, RequestOutput] = {}
    for step in range(100):
        if step == 4:
            engine.abort_request("b")
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if not engine.has_unfinished_requests():
            break

    assert sorted(done) == ["a", "c"]
    for request_id in done:
        assert _completions(done[request_id]) == _completions(expected[request_id])
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.capacity


def test_async_scheduling_refuses_what_needs_tokens_on_the_host():
    with pytest.raises(ValidationError, match="async_scheduling"):
        EngineConfig(model="demo", async_scheduling=True, speculative_method="ngram")
    with pytest.raises(ValidationError, match="async_scheduling"):
        EngineConfig(model="demo", async_scheduling=True, tensor_parallel_size=2)


def test_auto_is_off_on_cpu(tiny_engine):
    assert not tiny_engine(max_model_len=64).async_scheduling


@pytest.mark.gpu
def test_on_cuda_async_is_the_default_and_keeps_outputs_with_graphs(dummy_model):
    """On the GPU the overlap is real: steps replay CUDA graphs while the host prepares the next."""
    base = dict(model=dummy_model, load_format="dummy", dtype="float32", device="cuda", max_model_len=96,
                block_size=4, num_kv_blocks=40, max_num_batched_tokens=24, max_num_seqs=8)
    overlapped = LLMEngine(EngineConfig(**base))
    assert overlapped.runner.decode_graphs is not None
    sync = LLMEngine(EngineConfig(**base, async_scheduling=False), loaded=overlapped.loaded)
    _assert_same_outputs(sync, overlapped, _mixed_workload(0, vocab=512))
