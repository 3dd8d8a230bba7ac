"""The chart's alert rules, checked by the real promtool: the rendered PrometheusRule is a valid
rule file, each alert fires on the series of alerts-test.yaml that should fire it and not on the
others, and thresholds from values reach the expressions."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Render, one, venv_tool

UNIT_TESTS = Path(__file__).with_name("alerts-test.yaml")
MONITORING_ON = ["monitoring.enabled=true"]


@pytest.fixture(scope="session")
def promtool() -> Path:
    return venv_tool("promtool", "scripts/install-monitoring-tools.sh")


def run_promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result


def rules(render: Render, values: Path | None = None) -> dict[str, Any]:
    """The rule file the chart's PrometheusRule carries: its spec."""
    return one(render(values=[values] if values else [], sets=MONITORING_ON), "PrometheusRule")["spec"]


def test_rendered_rules_pass_promtool_check(render: Render, promtool: Path, tmp_path: Path) -> None:
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules(render)))
    result = run_promtool(promtool, "check", "rules", "alerts.yaml", cwd=tmp_path)
    assert "SUCCESS: 7 rules found" in result.stdout


def test_each_alert_fires_on_its_series_and_not_on_quiet_ones(render: Render, promtool: Path, tmp_path: Path) -> None:
    spec = rules(render)
    runbooks = {rule["alert"]: rule["annotations"]["runbook"] for group in spec["groups"] for rule in group["rules"]}
    unit_tests = yaml.safe_load(UNIT_TESTS.read_text())
    tested = set()
    for case in unit_tests["tests"]:
        for check in case["alert_rule_test"]:
            tested.add(check["alertname"])
            for alert in check["exp_alerts"]:
                assert "{{" not in runbooks[check["alertname"]]
                alert["exp_annotations"]["runbook"] = runbooks[check["alertname"]]
    assert tested == set(runbooks), "every alert has unit tests"
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "alerts-test.yaml").write_text(yaml.safe_dump(unit_tests))
    run_promtool(promtool, "test", "rules", "alerts-test.yaml", cwd=tmp_path)


def test_every_alert_says_what_it_means_and_what_to_check(render: Render) -> None:
    for group in rules(render)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning")
            assert set(rule["annotations"]) == {"summary", "description", "runbook"}, rule["alert"]
            assert all(len(text) > 40 for text in rule["annotations"].values()), rule["alert"]


def test_thresholds_and_alert_labels_come_from_values(render: Render, promtool: Path, tmp_path: Path) -> None:
    # A values file: `helm --set` would pass 2.5 as a string, which the schema refuses.
    (tmp_path / "values.yaml").write_text(yaml.safe_dump({"monitoring": {"rules": {
        "ttft": {"thresholdSeconds": 2.5, "objective": 0.999, "burnRate": 14.4},
        "interTokenLatency": {"thresholdSeconds": 0.05, "objective": 0.99, "burnRate": 6},
        "kvCacheFull": {"usage": 0.9, "for": "10m"}, "queueGrowing": {"waiting": 64, "for": "10m"},
        "workerRestarts": {"restarts": 3, "window": "30m"}, "heldRequests": {"for": "1m"},
        "alertLabels": {"team": "ml-platform"},
    }}}))
    spec = rules(render, tmp_path / "values.yaml")
    by_name = {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"]}
    assert 'kvflock_time_to_first_token_seconds_bucket{le="2.5"}' in by_name["KvflockTTFTBudgetBurn"]["expr"]
    assert "> 14.4 * (1 - 0.999)" in by_name["KvflockTTFTBudgetBurn"]["expr"]
    assert "the objective allows 0.1%" in by_name["KvflockTTFTBudgetBurn"]["annotations"]["description"]
    assert 'kvflock_inter_token_latency_seconds_bucket{le="0.05"}' in by_name["KvflockInterTokenLatencyBudgetBurn"]["expr"]
    assert "> 6 * (1 - 0.99)" in by_name["KvflockInterTokenLatencyBudgetBurn"]["expr"]
    assert "> 0.9\n" in by_name["KvflockKVCacheFullPreempting"]["expr"]
    assert "> 64\n" in by_name["KvflockQueueGrowing"]["expr"]
    assert "[30m]" in by_name["KvflockWorkerRestarting"]["expr"]
    assert by_name["KvflockRouterHoldingRequests"]["for"] == "1m"
    assert all(rule["labels"]["team"] == "ml-platform" for rule in by_name.values())
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(spec))
    run_promtool(promtool, "check", "rules", "alerts.yaml", cwd=tmp_path)
