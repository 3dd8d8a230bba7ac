"""The chart's monitoring: PodMonitors and a ServiceMonitor that find the pods the operator makes,
the PrometheusRule, and the Grafana dashboards' ConfigMaps, rendered with the values on and off;
the Prometheus Operator's resources valid by its published types; and every metric the alerts
and dashboards read one that kvflock exports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvflock.operator.children import LABEL_ROLE, LABEL_SERVICE

from .conftest import CHART, NAMESPACE, VALUES_ALL, Render, of_kind, one, run_helm, template_args
from .metric_names import exported_metric_names, promql_metric_names, worker_exposition

CRDS_PRESENT = ["--api-versions", "monitoring.coreos.com/v1"]
MONITORING_KINDS = ("PodMonitor", "ServiceMonitor", "PrometheusRule")
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
VALIDATOR = Path(__file__).with_name("validate_prometheus_operator.mjs")


def render_args(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = run_helm(helm, *template_args(), *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def monitoring_kinds(manifests: list[dict[str, Any]]) -> list[str]:
    return sorted(m["kind"] for m in manifests if m["kind"] in MONITORING_KINDS)


ALL_THREE = ["PodMonitor", "PodMonitor", "PrometheusRule", "ServiceMonitor"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], []),
        (CRDS_PRESENT, ALL_THREE),
        (["--set", "monitoring.enabled=true"], ALL_THREE),
        (["--set", "monitoring.enabled=false", *CRDS_PRESENT], []),
        (["--set", "monitoring.rules.enabled=false", *CRDS_PRESENT], ["PodMonitor", "PodMonitor", "ServiceMonitor"]),
        (["--set", "metrics.service.enabled=false", *CRDS_PRESENT], ["PodMonitor", "PodMonitor", "PrometheusRule"]),
    ],
    ids=["auto-without-crds", "auto-with-crds", "forced-on", "forced-off", "rules-off", "no-operator-service"],
)
def test_monitoring_renders_where_the_prometheus_operator_is_or_when_forced(
    helm: Path, args: list[str], expected: list[str],
) -> None:
    assert monitoring_kinds(render_args(helm, *args)) == expected


def test_pod_monitors_select_the_operators_worker_and_router_pods(helm: Path) -> None:
    manifests = render_args(helm, *CRDS_PRESENT, "--set", "monitoring.labels.release=prom")
    for role in ("worker", "router"):
        monitor = one(manifests, "PodMonitor", component=f"{role}s")
        assert monitor["metadata"]["labels"]["release"] == "prom"
        spec = monitor["spec"]
        assert spec["selector"] == {"matchLabels": {LABEL_ROLE: role},
                                    "matchExpressions": [{"key": LABEL_SERVICE, "operator": "Exists"}]}
        assert spec["namespaceSelector"] == {"any": True}  # a cluster-scoped operator's services are anywhere
        (endpoint,) = spec["podMetricsEndpoints"]
        assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http", "/metrics", "15s")
        targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
        assert targets["inferenceservice"] == ["__meta_kubernetes_pod_label_kvflock_dev_service"]
        assert targets["instance"] == ["__meta_kubernetes_pod_name"]


def test_worker_pods_port_is_named_http_as_the_monitors_expect() -> None:
    from kvflock.operator import children, router_children

    source = Path(children.__file__).read_text() + Path(router_children.__file__).read_text()
    assert source.count('"name": "http", "containerPort"') == 2


def test_namespaced_operator_is_monitored_in_its_namespace_only(helm: Path) -> None:
    manifests = render_args(helm, *CRDS_PRESENT, "--set", "operator.scope=namespace")
    for monitor in of_kind(manifests, "PodMonitor"):
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_operator_service_monitor_scrapes_the_metrics_service(helm: Path) -> None:
    manifests = render_args(helm, *CRDS_PRESENT)
    service = one(manifests, "Service")
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]


@pytest.fixture(scope="session")
def operator_models() -> Path:
    path = Path(sys.executable).parent.parent / "lib" / "prometheus-operator-models"
    if not (path / "node_modules").exists() or shutil.which("node") is None:
        pytest.skip(f"no Prometheus Operator validators at {path} or no node: run `make venv`")
    return path


def validate_with_operator_types(manifests: list[dict[str, Any]], models: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(VALIDATOR), str(models)], input=json.dumps(manifests), capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("values", ["default", "values-all"])
def test_monitoring_resources_are_valid_prometheus_operator_objects(
    render: Render, operator_models: Path, values: str,
) -> None:
    manifests = render(values=[VALUES_ALL] if values == "values-all" else [], sets=["monitoring.enabled=true"])
    resources = [m for m in manifests if m["kind"] in MONITORING_KINDS]
    assert len(resources) == 4
    result = validate_with_operator_types(resources, operator_models)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_types_refuse_a_broken_monitor(render: Render, operator_models: Path) -> None:
    monitor = one(render(sets=["monitoring.enabled=true"]), "PodMonitor", component="workers")
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 8000
    result = validate_with_operator_types([monitor], operator_models)
    assert result.returncode == 1 and "port must be string" in result.stdout


def test_dashboards_render_as_configmaps_for_grafanas_sidecar(render: Render) -> None:
    assert of_kind(render(), "ConfigMap") == []  # off by default
    maps = of_kind(render(sets=["dashboards.enabled=true"]), "ConfigMap")
    assert sorted(m["metadata"]["name"] for m in maps) == [f"kvflock-dashboard-{p.stem}" for p in DASHBOARDS]
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == NAMESPACE
        ((name, text),) = config_map["data"].items()
        assert text == (CHART / "dashboards" / name).read_text().rstrip("\n")


def test_dashboard_label_namespace_and_annotations_come_from_values(render: Render) -> None:
    maps = of_kind(render(sets=["dashboards.enabled=true", "dashboards.label=grafana-dash",
                                "dashboards.labelValue=kvflock", "dashboards.namespace=monitoring",
                                "dashboards.annotations.grafana_folder=LLM"]), "ConfigMap")
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana-dash"] == "kvflock"
        assert "grafana_dashboard" not in config_map["metadata"]["labels"]
        assert config_map["metadata"]["namespace"] == "monitoring"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL query of a dashboard: its panels' targets and its template variables'."""
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0])
    return queries


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_is_grafana_json_with_a_datasource_variable(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] == f"kvflock-{path.stem}" and dashboard["title"].startswith("kvflock / ")
    assert dashboard["description"]
    assert dashboard["templating"]["list"][0] == {**dashboard["templating"]["list"][0], "name": "datasource",
                                                   "type": "datasource", "query": "prometheus"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["title"] and panel["description"] and panel["targets"]


def rules_and_dashboard_queries(render: Render) -> list[tuple[str, str]]:
    rule_spec = one(render(sets=["monitoring.enabled=true"]), "PrometheusRule")["spec"]
    queries = [(f"alert {rule['alert']}", rule["expr"]) for group in rule_spec["groups"] for rule in group["rules"]]
    for path in DASHBOARDS:
        queries += [(f"dashboard {path.stem}", expr) for expr in dashboard_queries(json.loads(path.read_text()))]
    return queries


def test_every_metric_the_alerts_and_dashboards_read_is_one_kvflock_exports(render: Render) -> None:
    exported = exported_metric_names()
    unknown = []
    for where, expr in rules_and_dashboard_queries(render):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric name found in {expr!r}"
        unknown += [f"{where}: {name}" for name in sorted(names - exported)]
    assert unknown == []


def test_metric_name_parser_skips_functions_labels_and_keywords() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, pod) (rate(a_bucket{le="1.0", pod=~"$pod"}[$__rate_interval])))'
            ' > 14.4 * (1 - 0.99) and on (pod) b / ignoring (x) c:d unless e offset 5m')
    assert promql_metric_names(expr) == {"a_bucket", "b", "c:d", "e"}


def test_dashboard_queries_parse_as_promql(render: Render, tmp_path: Path) -> None:
    """promtool parses every dashboard query (as a recording rule), Grafana's variables filled in."""
    promtool = Path(sys.executable).parent / "promtool"
    if not promtool.exists():
        pytest.skip(f"no promtool at {promtool}: run `make venv`")
    filled = {"$__rate_interval": "1m", "$namespace": "ml", "$inferenceservice": "llm"}
    rules = []
    for index, (_, expr) in enumerate(q for q in rules_and_dashboard_queries(render) if q[0].startswith("dashboard")):
        for variable, value in filled.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query{index}", "expr": expr})
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([str(promtool), "check", "rules", "queries.yaml"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_latency_threshold_the_schema_allows_is_a_worker_bucket(render: Render, tmp_path: Path) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = schema["definitions"]["sloAlert"]["properties"]["thresholdSeconds"]["enum"]
    buckets = {line.split('le="')[1].split('"')[0] for line in worker_exposition().splitlines()
               if line.startswith("kvflock_time_to_first_token_seconds_bucket")} - {"+Inf"}
    rendered = set()
    for seconds in allowed:
        values = tmp_path / "values.yaml"
        values.write_text(yaml.safe_dump({"monitoring": {"enabled": True, "rules": {"ttft": {
            "thresholdSeconds": seconds, "objective": 0.99, "burnRate": 14.4}}}}))
        spec = one(render(values=[values]), "PrometheusRule")["spec"]
        expr = next(r["expr"] for g in spec["groups"] for r in g["rules"] if r["alert"] == "KvflockTTFTBudgetBurn")
        rendered.add(expr.split('le="')[1].split('"')[0])
    assert rendered == buckets


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "monitoring.enabled=maybe"], 'monitoring.enabled must be one of the following: "auto", true, false'),
        (["--set-json", "monitoring.rules.ttft.thresholdSeconds=0.3"], "monitoring.rules.ttft.thresholdSeconds must be one of"),
        (["--set-json", "monitoring.rules.ttft.objective=1"], "monitoring.rules.ttft.objective: Must be less than 1"),
        (["--set", "monitoring.interval=15"], "monitoring.interval: Invalid type. Expected: string, given: integer"),
        (["--set", "monitoring.rules.kvCacheFull.for=ten"], "monitoring.rules.kvCacheFull.for: Does not match pattern"),
        (["--set", "dashboards.labelValue=not ok"], "dashboards.labelValue: Does not match pattern"),
        (["--set", "dashboards.enabled=yes"], "dashboards.enabled: Invalid type. Expected: boolean, given: string"),
    ],
    ids=["enabled", "threshold-not-a-bucket", "objective", "interval", "duration", "label-value", "dashboards"],
)
def test_bad_monitoring_value_fails_with_the_schemas_message(helm: Path, args: list[str], message: str) -> None:
    result = run_helm(helm, *template_args(), *args, check=False)
    assert result.returncode != 0, f"helm accepted {args}"
    assert message in result.stderr
