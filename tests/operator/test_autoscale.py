"""The autoscaler's pure decision, driven with a clock of our own."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from kvflock.operator.autoscale import Decision, History, Sample, decide, histogram_quantile, recommend
from kvflock.operator.crd import AutoscalingSpec

T0 = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


def scaling(**fields: Any) -> AutoscalingSpec:
    values = {"enabled": True, "minReplicas": 1, "maxReplicas": 4, "target": 4,
              "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 60, **fields}
    return AutoscalingSpec.model_validate(values)


def busy(replicas: int, per_replica: int) -> list[Sample]:
    return [Sample(in_flight=per_replica) for _ in range(replicas)]


class Driver:
    """Runs the autoscaler every `step` seconds as the operator's timer does, applying each decision."""

    def __init__(self, spec: AutoscalingSpec, replicas: int, step: float = 5.0) -> None:
        self.spec, self.replicas, self.step = spec, replicas, step
        self.now = T0
        self.history: History | None = None
        self.trace = [replicas]

    def tick(self, load_per_replica: float = 0, held: int = 0, total_load: int | None = None) -> Decision:
        if total_load is not None:
            samples = [Sample(in_flight=total_load // max(self.replicas, 1)) for _ in range(self.replicas)]
        else:
            samples = [Sample(in_flight=int(load_per_replica)) for _ in range(self.replicas)]
        decision = decide(samples, self.replicas, self.spec, self.history, self.now, held)
        self.history, self.replicas = decision.history, decision.desired
        self.trace.append(self.replicas)
        self.now += datetime.timedelta(seconds=self.step)
        return decision


def changes(trace: list[int]) -> int:
    return sum(1 for a, b in zip(trace, trace[1:], strict=False) if a != b)


def test_queue_depth_over_target_asks_for_proportionally_more_replicas() -> None:
    replicas, value, _ = recommend(busy(2, 8), 2, scaling())
    assert (replicas, value) == (4, 8.0)


def test_within_ten_percent_of_the_target_keeps_the_replicas() -> None:
    assert recommend([Sample(in_flight=4), Sample(in_flight=4), Sample(in_flight=5)], 3, scaling())[0] == 3


def test_recommendations_are_clamped_to_min_and_max() -> None:
    assert recommend(busy(2, 100), 2, scaling())[0] == 4
    assert recommend(busy(3, 0), 3, scaling(minReplicas=2))[0] == 2


def test_kv_cache_utilization_is_averaged_over_the_replicas_that_report_it() -> None:
    samples = [Sample(kv_usage=0.9), Sample(kv_usage=0.7), Sample()]
    replicas, value, _ = recommend(samples, 3, scaling(metric="kvCacheUtilization", target=0.4))
    assert value == pytest.approx(0.8) and replicas == 4  # ceil(3 * 0.8 / 0.4) = 6, clamped


def test_no_metrics_keeps_the_current_replicas() -> None:
    replicas, value, reason = recommend([Sample(), Sample()], 2, scaling(metric="ttftP99", target=0.5))
    assert (replicas, value) == (2, None) and "no replica reported" in reason


def test_sustained_load_scales_to_max_and_no_load_back_to_min_after_the_window() -> None:
    driver = Driver(scaling(), replicas=1)
    for _ in range(6):
        driver.tick(total_load=40)
    assert driver.replicas == 4
    for _ in range(11):  # 55 s of no load: still inside the 60 s down-window
        driver.tick(0)
        assert driver.replicas == 4
    driver.tick(0)
    driver.tick(0)
    assert driver.replicas == 1
    assert changes(driver.trace) == 2, driver.trace  # one step up, one step down


def test_oscillating_load_does_not_flap() -> None:
    driver = Driver(scaling(), replicas=1)
    for i in range(40):  # busy and idle in turn, 10 s each
        driver.tick(total_load=16 if (i // 2) % 2 == 0 else 0)
    assert driver.trace[-1] == 4
    assert changes(driver.trace) == 1, driver.trace


def test_scale_up_window_ignores_a_short_burst() -> None:
    driver = Driver(scaling(scaleUpStabilizationSeconds=15), replicas=1)
    driver.tick(total_load=16)
    driver.tick(0)
    driver.tick(0)
    assert driver.replicas == 1
    for _ in range(4):
        driver.tick(total_load=16)
    assert driver.replicas == 4


def test_a_restarted_operator_waits_a_whole_window_before_scaling_down() -> None:
    driver = Driver(scaling(), replicas=3)
    driver.tick(0)
    assert driver.replicas == 3
    for _ in range(13):
        driver.tick(0)
    assert driver.replicas == 1


def test_idle_service_scales_to_zero_after_the_window_and_a_held_request_wakes_it() -> None:
    driver = Driver(scaling(minReplicas=0, scaleDownStabilizationSeconds=10), replicas=1)
    for _ in range(4):
        driver.tick(0)
    assert driver.replicas == 0
    decision = driver.tick(held=1)
    assert driver.replicas == 1 and "held by the router" in decision.reason
    assert recommend([], 0, scaling(minReplicas=0), held=9)[0] == 3


def test_histogram_quantile_reads_only_the_new_observations() -> None:
    before = [(0.1, 10.0), (1.0, 10.0), (float("inf"), 10.0)]
    after = [(0.1, 10.0), (1.0, 110.0), (float("inf"), 110.0)]
    assert histogram_quantile(0.99, before, after) == pytest.approx(0.991)
    assert histogram_quantile(0.99, after, after) is None
