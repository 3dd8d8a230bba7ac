"""Validation: the simulator against the local cluster on the same trace.

bench/fleet.py streamed 48 completions, 8 at a time, through the router to 2 CPU workers of
SmolLM2-135M (one torch thread each): fresh system prompts of about 400 tokens, each followed by a
distinct question, 16 output tokens; bench/results/fleet-cpu.md has what it measured. Here the
same trace goes through the real Router to 2 simulated replicas whose cost model is fitted to
SmolLM2 step times measured now, on this CPU, with the engine itself (one thread, as fleet.py
gives each worker). Prints simulated against measured TTFT, throughput and hit rate, and the error.

    python -P bench/fleetsim/run.py --validate
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from fleetsim.cost_model import CostModel, Measurement, batch_features, fit, report
from fleetsim.fleet import Fleet, FleetSpec, PoolSpec, percentile
from fleetsim.replica import EngineParams
from fleetsim.trace import Session, Trace, TraceSpec, Turn
from kvflock.shared.hashing import hash_blocks

# fleet.py's workers: `kvflock serve --max-model-len 2048` on CPU: 1 GiB of float32 KV for SmolLM2
# (30 layers x 3 KV heads x 64 dims x K and V x 4 bytes = 46,080 bytes a token) in blocks of 16.
CPU_PARAMS = EngineParams(kv_blocks=2**30 // (46_080 * 16))
SYSTEM_TOKENS, QUESTION_TOKENS, OUTPUT_TOKENS, REQUESTS, CONCURRENCY = 400, 15, 16, 48, 8

# bench/results/fleet-cpu.md: requests/s, TTFT p50 and p99 (s), the workers' prefix-cache hit rate.
MEASURED = {
    ("8 system prompts x 6 turns", 8): {"round-robin": (2.45, 1.059, 3.650, 0.589),
                                        "prefix-aware": (2.76, 0.339, 4.694, 0.769)},
    ("4 system prompts x 12 turns (VM load 6-8)", 4): {"round-robin": (1.26, 0.650, 7.993, 0.746),
                                                       "prefix-aware": (1.43, 0.632, 9.112, 0.806)},
}


@dataclass(frozen=True)
class _Shape:
    prompts: int
    prompt_tokens: int
    output_tokens: int


SHAPES = (_Shape(1, 400, 1), _Shape(4, 400, 1), _Shape(1, 16, 33), _Shape(8, 16, 33), _Shape(8, 400, 16))


def measure_cpu() -> tuple[Measurement, ...]:
    """Times the engine on this CPU for each shape (distinct random prompts: no prefix hits)."""
    import torch

    from kvflock.worker.config import SamplingParams
    from kvflock.worker.llm import LLM

    torch.set_num_threads(1)
    llm = LLM("demo", device="cpu", dtype="float32", max_model_len=2048)
    rng = random.Random(0)
    prompt = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]  # noqa: E731
    llm.generate([prompt(400)] * 2, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    measurements = []
    for shape in SHAPES:
        params = SamplingParams(max_tokens=shape.output_tokens, temperature=0, ignore_eos=True)
        prompts = [prompt(shape.prompt_tokens) for _ in range(shape.prompts)]
        began = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - began
        measurements.append(Measurement(
            "measured now (validate.py)", f"{shape.prompts} x ({shape.prompt_tokens} in, {shape.output_tokens} out)",
            seconds, lambda s=shape: batch_features(s.prompts, s.prompt_tokens, s.output_tokens, CPU_PARAMS)))
    del llm
    return tuple(measurements)


class ClosedLoopTrace(Trace):
    """fleet.py's workload: `concurrency` users, each sending its next prompt when the previous
    answer is complete; prompts over `prefixes` system prompts in a shuffled order."""

    def __init__(self, prefixes: int, seed: int) -> None:
        self.spec, self.block_size = TraceSpec(duration_s=1e9), 16
        rng = random.Random(seed)
        systems = [[rng.randrange(1000, 40000) for _ in range(SYSTEM_TOKENS)] for _ in range(prefixes)]
        order = [i % prefixes for i in range(REQUESTS)]
        rng.shuffle(order)
        self._prompts = []
        for p in order:
            tokens = systems[p] + [rng.randrange(1000, 40000) for _ in range(QUESTION_TOKENS)]
            self._prompts.append((len(tokens), tuple(hash_blocks(tokens, 16))))
        per_user = REQUESTS // CONCURRENCY
        self.sessions = [Session(u, 0.0, 0, [Turn(QUESTION_TOKENS, OUTPUT_TOKENS, 0.0)] * per_user)
                         for u in range(CONCURRENCY)]

    def prompt(self, session: Session, turn: int) -> tuple[int, tuple[int, ...]]:
        return self._prompts[turn * CONCURRENCY + session.id]


def simulate(cost: CostModel, prefixes: int, policy: str) -> tuple[float, float, float, float]:
    spec = FleetSpec((PoolSpec("all", 2, CPU_PARAMS),), policy)  # type: ignore[arg-type]
    result = Fleet(spec, ClosedLoopTrace(prefixes, 0), cost).run()
    ttfts = result.ttfts()
    span = max(r.finished_at or 0.0 for r in result.requests)
    return (len(result.requests) / span, percentile(ttfts, 0.5), percentile(ttfts, 0.99),
            result.blocks_hit / max(1, result.blocks_looked_up))


def main() -> None:
    measurements = measure_cpu()
    cost = fit(measurements)
    print(report(cost, measurements, "SmolLM2-135M, this CPU, 1 thread, float32"))
    print("\n| workload | policy | figure | simulated | measured (fleet-cpu.md) | error |\n|---|---|---|---|---|---|")
    for (name, prefixes), policies in MEASURED.items():
        for policy, measured in policies.items():
            simulated = simulate(cost, prefixes, policy)
            labels = ("requests/s", "TTFT p50 s", "TTFT p99 s", "prefix hit rate")
            for label, sim, real in zip(labels, simulated, measured):
                print(f"| {name} | {policy} | {label} | {sim:.3f} | {real:.3f} | {sim / real - 1:+.0%} |")
