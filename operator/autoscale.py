"""The autoscaler's decision: the workers' load in, a replica count within [minReplicas, maxReplicas] out.

A pure function of the load samples, the current replicas, the spec, the recent
recommendations and the time, so that a test can drive the clock. It follows the Horizontal
Pod Autoscaler's algorithm and behaviour:

- The recommendation is `ceil(replicas * value / target)`, where `value` is the metric per
  replica: `queueDepth` (requests running + waiting, summed over the replicas and divided by
  the current replicas), `kvCacheUtilization` or `ttftP99` (seconds; both averaged over the
  replicas that reported them). Within 10% of the target it keeps the current count.
- Requests the router holds while no replica is ready count as queued load, and any held
  request asks for at least one replica: that is how a service scaled to zero wakes up.
- Stabilization: a scale-up goes only as high as the lowest recommendation of the last
  `scaleUpStabilizationSeconds`, a scale-down only as low as the highest recommendation of
  the last `scaleDownStabilizationSeconds`. A burst does not scale up on one sample (with a
  window), and load that comes and goes does not flap: the replicas stay up until the load
  has been low for a whole window. Until the history spans a window (the operator just
  started, or autoscaling was just enabled), the current count counts as a recommendation.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvflock.operator.crd import AutoscalingSpec

# Within this share of the target, the current replicas are kept (HPA's default tolerance).
TOLERANCE = 0.1


@dataclass(frozen=True)
class Sample:
    """One replica's load, as the operator last read it from its /metrics."""

    in_flight: int | None = None  # requests running + waiting
    kv_usage: float | None = None  # share of KV blocks in use
    ttft_p99: float | None = None  # seconds, over the requests since the previous read


@dataclass(frozen=True)
class Recommendation:
    at: datetime.datetime
    replicas: int


@dataclass(frozen=True)
class History:
    """Recent recommendations, and since when they are kept (the start of the record)."""

    since: datetime.datetime
    recommendations: tuple[Recommendation, ...] = ()


@dataclass(frozen=True)
class Decision:
    desired: int
    recommended: int  # from the load alone, before stabilization
    value: float | None  # the metric per replica (None: nobody reported it)
    reason: str
    history: History


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 2.0000000001 from float division still means 2


def _metric_value(samples: Sequence[Sample], replicas: int, spec: AutoscalingSpec, held: int) -> float | None:
    if spec.metric == "queueDepth":
        loads = [s.in_flight for s in samples if s.in_flight is not None]
        if not loads and not held:
            return None if replicas else 0.0
        return (sum(loads) + held) / max(replicas, 1)
    values = [s.kv_usage if spec.metric == "kvCacheUtilization" else s.ttft_p99 for s in samples]
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def recommend(samples: Sequence[Sample], replicas: int, spec: AutoscalingSpec, held: int = 0,
              workers_per_replica: int = 1) -> tuple[int, float | None, str]:
    """The replicas the load asks for now (clamped to the bounds), the metric, and why.

    With length pools, one replica of the count is a worker in each pool that follows it
    (`workers_per_replica`), so the queued requests spread over that many workers each."""
    value = _metric_value(samples, replicas * workers_per_replica, spec, held)
    if value is None:
        raw, reason = replicas, f"no replica reported {spec.metric}; keeping {replicas}"
    elif replicas == 0:
        raw = _ceil(value / (spec.target * workers_per_replica))
        reason = f"{spec.metric} {value:g} with no replica, target {spec.target:g} per replica"
    elif abs(value / spec.target - 1) <= TOLERANCE:
        raw, reason = replicas, f"{spec.metric} {value:g} per replica is within 10% of the target {spec.target:g}"
    else:
        raw = _ceil(replicas * value / spec.target)
        reason = f"{spec.metric} {value:g} per replica against a target of {spec.target:g}"
    if held > 0:
        raw = max(raw, 1)
        reason += f"; {held} request(s) held by the router"
    clamped = min(max(raw, spec.minReplicas), spec.maxReplicas)
    if clamped != raw:
        reason += f"; {raw} clamped to [{spec.minReplicas}, {spec.maxReplicas}]"
    return clamped, value, reason


def decide(samples: Sequence[Sample], replicas: int, spec: AutoscalingSpec, history: History | None,
           now: datetime.datetime, held: int = 0, workers_per_replica: int = 1) -> Decision:
    """The replicas to run now, after stabilization, and the history to pass to the next call."""
    recommended, value, reason = recommend(samples, replicas, spec, held, workers_per_replica)
    up = datetime.timedelta(seconds=spec.scaleUpStabilizationSeconds)
    down = datetime.timedelta(seconds=spec.scaleDownStabilizationSeconds)
    since = history.since if history is not None else now
    kept = tuple(r for r in (history.recommendations if history else ()) if r.at >= now - max(up, down))
    recommendations = (*kept, Recommendation(now, recommended))

    def window(length: datetime.timedelta) -> list[int]:
        values = [r.replicas for r in recommendations if r.at >= now - length]
        return values + ([replicas] if now - since < length else [])

    if recommended > replicas:
        desired = max(replicas, min(window(up)))
        if desired < recommended:
            reason += f"; scale-up to {recommended} held at {desired} by the {spec.scaleUpStabilizationSeconds}s window"
    elif recommended < replicas:
        desired = min(replicas, max(window(down)))
        if desired > recommended:
            reason += (f"; scale-down to {recommended} held at {desired} by the"
                       f" {spec.scaleDownStabilizationSeconds}s window")
    else:
        desired = replicas
    desired = min(max(desired, spec.minReplicas), spec.maxReplicas)
    return Decision(desired, recommended, value, reason, History(since, recommendations))


def histogram_quantile(quantile: float, before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]]
                       ) -> float | None:
    """The `quantile` of the observations a Prometheus histogram gained between two reads.

    `before` and `after` are its cumulative buckets as (upper bound, count), +Inf last; the
    answer interpolates linearly within the bucket, as PromQL's histogram_quantile does, and
    is None when nothing was observed in between (or the worker restarted)."""
    earlier = dict(before)
    deltas = [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]
    if not deltas or any(d < 0 for _, d in deltas) or deltas[-1][1] <= 0:
        return None
    rank = quantile * deltas[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in deltas:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None
