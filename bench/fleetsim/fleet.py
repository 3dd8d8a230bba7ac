"""The discrete-event fleet: simulated replicas behind the real kvflock Router, resized by the real
autoscaler, on a heap of events (no wall clock).

What runs real code and what is simulated:
- Routing: `kvflock.router.policy.Router.choose`, on `ReplicaView` snapshots built the way the
  router's app builds them: its own requests in flight and their prompt tokens are exact and
  current; readiness follows the replica's start-up; the KV usage is what the last poll (every
  `poll_s`) read; the prefix index's capacity is the replica's KV blocks, as /metrics reports.
  A refusal (no replica ready) holds the request until one is, as the router does.
- Autoscaling: `kvflock.operator.autoscale.decide` every `autoscale_s`, per pool, on the load
  samples a replica's /metrics would give; new replicas serve after `startup_s`; a replica
  scaled in drains (the router stops sending to it) and goes once idle.
- Failures: at the trace's failure times a share of the ready replicas dies; every request it
  held is routed again and recomputed from scratch (what the router does before the first
  byte; one whose stream had begun counts as cut), and a replacement starts cold.
- The replicas themselves are `replica.Replica` engine models timed by a cost model.
"""

from __future__ import annotations

import datetime
import heapq
import math
import random
from dataclasses import dataclass, field

from kvflock.operator.autoscale import History, Sample, decide
from kvflock.operator.crd import AutoscalingSpec
from kvflock.router.policy import Policy, Pool, Refusal, ReplicaView, RequestFeatures, Router

from fleetsim.replica import EngineParams, Replica, Request, StepCost
from fleetsim.trace import Trace

_EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
ARRIVE, STEP, READY, FAIL, SCALE, POLL = range(6)


@dataclass(frozen=True)
class PoolSpec:
    name: str
    replicas: int
    params: EngineParams = EngineParams()
    price: float = 1.0  # cost of one replica-hour in H100-hours
    min_tokens: int = 0
    max_tokens: int | None = None
    autoscaling: AutoscalingSpec | None = None


@dataclass(frozen=True)
class FleetSpec:
    pools: tuple[PoolSpec, ...]
    policy: Policy = "prefix-aware"
    startup_s: float = 60.0  # pod scheduled to Ready: weights loaded, graphs captured
    autoscale_s: float = 15.0
    poll_s: float = 1.0


@dataclass
class _Member:
    replica: Replica
    price: float
    created: float
    ready: bool = False
    draining: bool = False
    generation: int = 0  # bumped when the replica dies, so that its pending step is ignored
    in_flight: int = 0
    queued_tokens: int = 0
    kv_usage: float = 0.0
    step_started: float = 0.0

    def view(self) -> ReplicaView:
        return ReplicaView(self.replica.id, self.replica.pool, self.ready, self.draining, True, False,
                           self.in_flight, self.queued_tokens, 0, self.kv_usage)


@dataclass
class Result:
    """Totals of one run. Throughput and cost are over the trace's window [0, duration): the
    drain after the last arrival, where the fleet idles down, would otherwise weigh in."""

    requests: list[Request]
    window_s: float
    gpu_seconds: float  # replica lifetimes within the window, price-weighted (H100-seconds)
    output_tokens: int  # generated within the window
    blocks_looked_up: int
    blocks_hit: int
    blocks_restored: int
    retried: int
    cut_streams: int
    preemptions: int
    peak_replicas: int
    routes: dict[str, int] = field(default_factory=dict)  # decisions by reason

    def ttfts(self) -> list[float]:
        return sorted(r.first_token_at - r.arrival for r in self.requests if r.first_token_at is not None)


class Fleet:
    def __init__(self, spec: FleetSpec, trace: Trace, cost: StepCost, seed: int = 0) -> None:
        self.spec, self.trace, self.cost = spec, trace, cost
        pools = [Pool(p.name, p.min_tokens, p.max_tokens) for p in spec.pools] if len(spec.pools) > 1 else []
        self.router = Router(spec.policy, pools)
        self.rng = random.Random(seed)
        self.members: dict[str, _Member] = {}
        self.views: dict[str, ReplicaView] = {}
        self.histories: dict[str, History | None] = {p.name: None for p in spec.pools}
        self.held: list[Request] = []
        self.requests: list[Request] = []
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._names = 0
        self.now = 0.0
        self.window = trace.spec.duration_s
        self.gpu_seconds = 0.0
        self.window_tokens = 0
        self.counters = {"looked_up": 0, "hit": 0, "restored": 0, "preemptions": 0}
        self.retried = self.cut = self.peak = 0
        self.routes: dict[str, int] = {}
        self.checks = False  # tests: check every replica's invariants after each event

    # -- events ------------------------------------------------------------------------------
    def _push(self, at: float, kind: int, payload: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, payload))

    def run(self) -> Result:
        for pool in self.spec.pools:
            for _ in range(pool.replicas):
                self._add(pool, ready_at=0.0)
        for session in self.trace.sessions:
            self._push(session.start, ARRIVE, (session, 0))
        for at in self.trace.spec.failures:
            self._push(at, FAIL)
        if any(p.autoscaling for p in self.spec.pools):
            self._push(self.spec.autoscale_s, SCALE)
        self._push(self.spec.poll_s, POLL)
        handlers = {ARRIVE: self._arrive, STEP: self._step_end, READY: self._ready, FAIL: self._fail,
                    SCALE: self._scale, POLL: self._poll}
        while self._events:
            self.now, _, kind, payload = heapq.heappop(self._events)
            handlers[kind](payload)
            if self.checks:
                for m in self.members.values():
                    m.replica.check()
        for m in list(self.members.values()):
            self._remove(m)
        return Result(self.requests, self.window, self.gpu_seconds, self.window_tokens,
                      self.counters["looked_up"], self.counters["hit"], self.counters["restored"], self.retried,
                      self.cut, self.counters["preemptions"], self.peak, self.routes)

    def _busy(self) -> bool:
        """Work remains beyond the periodic events (which stop once nothing else is pending)."""
        return bool(self.held) or any(k in (ARRIVE, STEP, FAIL) for _, _, k, _ in self._events) or any(
            m.in_flight for m in self.members.values())

    # -- replicas ----------------------------------------------------------------------------
    def _add(self, pool: PoolSpec, ready_at: float) -> _Member:
        self._names += 1
        replica = Replica(f"{pool.name}-{self._names}", pool.name, pool.params, self.cost)
        member = _Member(replica, pool.price, self.now)
        self.members[replica.id] = member
        self.router.index.set_capacity(replica.id, pool.params.kv_blocks)
        self.views[replica.id] = member.view()
        self.peak = max(self.peak, len(self.members))
        if ready_at <= self.now:
            self._ready(replica.id)
        else:
            self._push(ready_at, READY, replica.id)
        return member

    def _remove(self, member: _Member) -> None:
        replica = member.replica
        lifetime = min(self.now, self.window) - min(member.created, self.window)
        self.gpu_seconds += lifetime * member.price
        for key, value in (("looked_up", replica.prompt_blocks_looked_up), ("hit", replica.prompt_blocks_hit),
                           ("restored", replica.prompt_blocks_restored), ("preemptions", replica.preemptions)):
            self.counters[key] += value
        member.generation += 1
        del self.members[replica.id]
        del self.views[replica.id]
        self.router.index.forget(replica.id)

    def _update(self, member: _Member) -> None:
        self.views[member.replica.id] = member.view()

    def _kick(self, member: _Member) -> None:
        replica = member.replica
        if not member.ready:
            return
        if replica.step is None:
            step = replica.plan_step()
            if step is not None:
                member.step_started = self.now
                self._push(self.now + step.seconds, STEP, (replica.id, member.generation, step))
        else:  # a decode run stops after its current step, so that the next one takes the new request
            seconds = replica.cut(self.now - member.step_started)
            if seconds is not None:
                self._push(member.step_started + seconds, STEP, (replica.id, member.generation, replica.step))

    def _ready(self, replica_id: object) -> None:
        member = self.members.get(str(replica_id))
        if member is None:
            return
        member.ready = True
        self._update(member)
        held, self.held = self.held, []
        for request in held:
            self._dispatch(request)

    # -- requests ----------------------------------------------------------------------------
    def _arrive(self, payload: object) -> None:
        session, turn = payload  # type: ignore[misc]
        prompt_tokens, hashes = self.trace.prompt(session, turn)
        request = Request(len(self.requests), self.now, prompt_tokens, session.turns[turn].output_tokens, hashes,
                          session.id, turn)
        self.requests.append(request)
        self._dispatch(request)

    def _dispatch(self, request: Request, exclude: frozenset[str] = frozenset()) -> None:
        route = self.router.choose(RequestFeatures(request.prompt_tokens, request.block_hashes),
                                   list(self.views.values()), exclude)
        if isinstance(route, Refusal):
            self.held.append(request)
            return
        self.routes[route.reason] = self.routes.get(route.reason, 0) + 1
        member = self.members[route.replica]
        member.replica.enqueue(request)
        member.in_flight += 1
        member.queued_tokens += request.prompt_tokens
        self._update(member)
        self._kick(member)

    def _step_end(self, payload: object) -> None:
        replica_id, generation, step = payload  # type: ignore[misc]
        member = self.members.get(replica_id)
        # A dead replica's step, or a decode run's end that a cut moved earlier, is void.
        if member is None or member.generation != generation or member.replica.step is not step:
            return
        if self.now < self.window:
            self.window_tokens += step.tokens()
        for request in member.replica.finish_step(self.now):
            member.in_flight -= 1
            member.queued_tokens -= request.prompt_tokens
            session = self.trace.sessions[request.session]
            if request.turn + 1 < len(session.turns):
                self._push(self.now + session.turns[request.turn].think_s, ARRIVE, (session, request.turn + 1))
        self._update(member)
        if member.draining and member.in_flight == 0:
            self._remove(member)
        else:
            self._kick(member)

    # -- failures, polls, autoscaling ---------------------------------------------------------
    def _fail(self, _: object) -> None:
        ready = sorted(m.replica.id for m in self.members.values() if m.ready and not m.draining)
        if not ready:
            return
        share = self.trace.spec.failure_share
        for replica_id in self.rng.sample(ready, max(1, round(share * len(ready)))):
            member = self.members[replica_id]
            orphans = member.replica.evacuate()
            pool = next(p for p in self.spec.pools if p.name == member.replica.pool)
            self._remove(member)
            self._add(pool, ready_at=self.now + self.spec.startup_s)  # the pod is recreated, cold
            for request in orphans:
                self.retried += 1
                if request.first_token_at is not None:
                    self.cut += 1
                self._dispatch(request, exclude=frozenset({replica_id}))

    def _poll(self, _: object) -> None:
        for member in self.members.values():
            member.kv_usage = member.replica.kv_usage
            self._update(member)
        if self._busy():
            self._push(self.now + self.spec.poll_s, POLL)

    def _scale(self, _: object) -> None:
        at = _EPOCH + datetime.timedelta(seconds=self.now)
        for pool in self.spec.pools:
            if pool.autoscaling is None:
                continue
            members = [m for m in self.members.values() if m.replica.pool == pool.name and not m.draining]
            samples = [Sample(in_flight=m.replica.in_flight) for m in members if m.ready]
            held = sum(1 for r in self.held if self._pool_of(r) == pool.name)
            decision = decide(samples, len(members), pool.autoscaling, self.histories[pool.name], at, held)
            self.histories[pool.name] = decision.history
            for _ in range(decision.desired - len(members)):
                self._add(pool, ready_at=self.now + self.spec.startup_s)
            surplus = len(members) - decision.desired
            for member in sorted(members, key=lambda m: (m.ready, m.in_flight))[:max(0, surplus)]:
                member.draining = True
                if member.in_flight == 0:
                    self._remove(member)
                else:
                    self._update(member)
        if self._busy():
            self._push(self.now + self.spec.autoscale_s, SCALE)

    def _pool_of(self, request: Request) -> str:
        for pool in self.router.pools:
            if pool.admits(request.prompt_tokens):
                return pool.name
        return self.spec.pools[0].name


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
