"""The fleet simulator (bench/fleetsim/): the event loop's invariants, the engine model's prefix
cache and CPU tier, the cost model against its inputs, and that routing and autoscaling are the
real kvflock code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from kvflock.operator import autoscale  # noqa: E402
from kvflock.operator.crd import AutoscalingSpec  # noqa: E402
from kvflock.router import policy  # noqa: E402
from kvflock.shared.hashing import hash_blocks  # noqa: E402

from fleetsim import fleet as fleet_module  # noqa: E402
from fleetsim.cost_model import H100_MEASUREMENTS, h100, relative_errors  # noqa: E402
from fleetsim.fleet import Fleet, FleetSpec, PoolSpec  # noqa: E402
from fleetsim.replica import EngineParams, Replica, Request  # noqa: E402
from fleetsim.trace import Trace, TraceSpec  # noqa: E402

# The cost model reproduces each figure it was fitted to within this relative error.
COST_TOLERANCE = 0.15

SMALL = EngineParams(kv_blocks=400, cpu_blocks=300, restore_seconds_per_block=1e-4, max_num_seqs=16,
                     max_num_batched_tokens=512)


def small_trace(**changes: object) -> Trace:
    spec = dict(duration_s=20.0, sessions_per_s=2.0, system_prompts=4, system_tokens=(64, 600),
                short_tokens=(8, 64), long_tokens=(200, 1500), output_tokens=(4, 64), max_context=4000, seed=7)
    spec.update(changes)
    return Trace(TraceSpec(**spec))  # type: ignore[arg-type]


def run(trace: Trace, params: EngineParams = SMALL, replicas: int = 3, policy_name: str = "prefix-aware",
        autoscaling: AutoscalingSpec | None = None, monkeypatch: pytest.MonkeyPatch | None = None
        ) -> tuple[Fleet, fleet_module.Result, list[int]]:
    finished: list[int] = []
    cost = h100()  # fitted before counting: the fit runs the replica model too
    if monkeypatch is not None:
        original = Replica.finish_step

        def counting(self: Replica, now: float) -> list[Request]:
            done = original(self, now)
            finished.extend(r.id for r in done)
            return done

        monkeypatch.setattr(Replica, "finish_step", counting)
    sim = Fleet(FleetSpec((PoolSpec("all", replicas, params, autoscaling=autoscaling),), policy_name,
                          startup_s=5.0, autoscale_s=2.0), trace, cost)
    sim.checks = True
    return sim, sim.run(), finished


def test_every_request_finishes_exactly_once_and_kv_stays_within_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    # A KV cache of 400 blocks against prompts of up to ~2,000 tokens: evictions, the CPU tier and
    # preemptions all happen; `checks` asserts the block accounting after every event.
    trace = small_trace(sessions_per_s=4.0, failures=(5.0, 9.0, 12.0), failure_share=0.34)
    _, result, finished = run(trace, monkeypatch=monkeypatch)
    assert result.requests and sorted(finished) == [r.id for r in result.requests]
    assert all(r.finished_at is not None and r.first_token_at is not None for r in result.requests)
    assert all(r.arrival <= r.first_token_at <= r.finished_at for r in result.requests)  # type: ignore[operator]
    assert result.retried > 0  # the failures hit requests, which finished elsewhere
    assert result.blocks_hit > 0 and result.blocks_restored > 0


def test_a_prefix_hit_skips_its_blocks_prefill() -> None:
    replica = Replica("r", "all", EngineParams(max_num_batched_tokens=4096), h100())
    tokens = list(range(20 * 16 + 5))
    first = Request(0, 0.0, len(tokens), 1, tuple(hash_blocks(tokens, 16)))
    replica.enqueue(first)
    step = replica.plan_step()
    assert step is not None and step.prefill_tokens == len(tokens)
    replica.finish_step(step.seconds)
    longer = tokens + list(range(1000, 1100))
    second = Request(1, 1.0, len(longer), 1, tuple(hash_blocks(longer, 16)))
    replica.enqueue(second)
    step = replica.plan_step()
    assert step is not None
    assert second.hit_blocks == 20
    assert step.prefill_tokens == len(longer) - 20 * 16
    # A prompt held whole still computes its last token, whose logits give the first output.
    again = Request(2, 2.0, 20 * 16, 1, tuple(hash_blocks(tokens[: 20 * 16], 16)))
    replica.finish_step(1.0 + step.seconds)
    replica.enqueue(again)
    step = replica.plan_step()
    assert step is not None and step.prefill_tokens == 1 and again.hit_blocks == 20
    replica.check()


def test_evicted_blocks_come_back_from_the_cpu_tier_at_its_bandwidth() -> None:
    params = EngineParams(kv_blocks=24, cpu_blocks=64, restore_seconds_per_block=0.5, max_num_batched_tokens=4096)
    replica = Replica("r", "all", params, h100())
    a, b = list(range(325)), list(range(5000, 5325))  # 20 full blocks each: b evicts most of a
    for i, tokens in enumerate((a, b)):
        replica.enqueue(Request(i, 0.0, len(tokens), 1, tuple(hash_blocks(tokens, 16))))
        step = replica.plan_step()
        assert step is not None
        replica.finish_step(step.seconds)
        replica.check()
    again = Request(2, 0.0, len(a), 1, tuple(hash_blocks(a, 16)))
    replica.enqueue(again)
    step = replica.plan_step()
    assert step is not None and again.restored_blocks > 0
    assert step.prefill_tokens == len(a) - 16 * (again.hit_blocks + again.restored_blocks)
    assert step.seconds >= again.restored_blocks * 0.5
    replica.check()


def test_decode_runs_time_every_request_as_step_by_step_does() -> None:
    _, runs, _ = run(small_trace())
    _, steps, _ = run(small_trace(), params=EngineParams(**{**SMALL.__dict__, "decode_runs": False}))
    times = [t for r in runs.requests for t in (r.first_token_at, r.finished_at)]
    assert times == pytest.approx([t for r in steps.requests for t in (r.first_token_at, r.finished_at)], abs=1e-9)


def test_the_cost_model_reproduces_its_measured_inputs() -> None:
    errors = relative_errors(h100(), H100_MEASUREMENTS)
    assert all(abs(e) <= COST_TOLERANCE for e in errors), errors
    model = h100()
    assert min(model.fixed, model.a, model.b, model.c) >= 0
    assert all(m.source and (BENCH / "results" / m.source).exists() for m in H100_MEASUREMENTS)


def test_routing_and_autoscaling_are_kvflocks_own_code() -> None:
    assert fleet_module.Router is policy.Router
    assert fleet_module.decide is autoscale.decide
    assert fleet_module.ReplicaView is policy.ReplicaView
    # Heavy load on one replica with room to grow: the real autoscaler adds replicas, which
    # serve after their start-up; the real router's prefix-aware reasons show in the decisions.
    spec = AutoscalingSpec(enabled=True, minReplicas=1, maxReplicas=6, target=4, scaleDownStabilizationSeconds=5)
    sim, result, _ = run(small_trace(sessions_per_s=6.0), replicas=1, autoscaling=spec)
    assert isinstance(sim.router, policy.Router)
    assert result.peak_replicas > 1
    assert result.routes.get(policy.REASON_PREFIX_HIT, 0) > 0


def test_prefix_aware_routing_hits_more_than_round_robin() -> None:
    _, prefix, _ = run(small_trace(system_prompts=12))
    _, rr, _ = run(small_trace(system_prompts=12), policy_name="round-robin")
    assert prefix.blocks_hit / prefix.blocks_looked_up > rr.blocks_hit / rr.blocks_looked_up
    assert set(rr.routes) == {policy.REASON_ROUND_ROBIN}


def test_traces_are_seeded_and_hashed_as_workers_hash() -> None:
    one, two = small_trace(), small_trace()
    assert [(s.start, s.system, s.turns) for s in one.sessions] == [(s.start, s.system, s.turns) for s in two.sessions]
    session = next(s for s in one.sessions if len(s.turns) > 1)
    length0, hashes0 = one.prompt(session, 0)
    tokens0 = list(session.tokens)
    length1, hashes1 = one.prompt(session, 1)
    assert hashes0 == tuple(hash_blocks(tokens0, 16))
    assert length1 > length0 and hashes1[: len(hashes0)] == hashes0  # a later turn extends the earlier prompt


def test_run_refuses_bad_arguments_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-P", str(BENCH / "fleetsim" / "run.py"), "--gpus", "ten"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--gpus" in done.stderr and "Traceback" not in done.stderr



def test_length_pools_send_short_prompts_to_their_own_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[int, str] = {}
    original = Replica.enqueue

    def recording(self: Replica, request: Request) -> None:
        served[request.id] = self.pool
        original(self, request)

    monkeypatch.setattr(Replica, "enqueue", recording)
    pools = (PoolSpec("short", 2, SMALL, 0.35, 0, 512), PoolSpec("long", 2, SMALL, 1.0, 512, None))
    sim = Fleet(FleetSpec(pools), small_trace(), h100())
    sim.checks = True
    result = sim.run()
    assert {served[r.id] for r in result.requests if r.prompt_tokens < 512} == {"short"}
    assert {served[r.id] for r in result.requests if r.prompt_tokens >= 512} == {"long"}


def test_validation_replays_fleet_py_trace_closed_loop() -> None:
    from fleetsim.validate import CONCURRENCY, CPU_PARAMS, REQUESTS, ClosedLoopTrace

    trace = ClosedLoopTrace(prefixes=4, seed=0)
    result = Fleet(FleetSpec((PoolSpec("all", 2, CPU_PARAMS),)), trace, h100()).run()
    assert len(result.requests) == REQUESTS
    events = sorted([(r.arrival, 1) for r in result.requests] + [(r.finished_at or 0.0, -1) for r in result.requests])
    outstanding = peak = 0
    for _, change in events:  # a finish and the next arrival share a time; the finish sorts first
        outstanding += change
        peak = max(peak, outstanding)
    assert peak == CONCURRENCY
    assert result.blocks_hit > 0  # 4 system prompts over 48 requests
