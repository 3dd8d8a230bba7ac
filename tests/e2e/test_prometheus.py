"""The chart's dashboards against real data: a real Prometheus server (Debian's, which `make venv`
unpacks) scrapes the workers, the routers and the operator of a local cluster serving SmolLM2
(examples/smollm2-demo.yaml with n-gram speculative decoding on, so that its panels have data)
through file_sd targets labelled as the chart's PodMonitors label them, a short load goes
through, and every panel's PromQL of every dashboard must return data, reading only metrics
that the scraped processes really export.

With KVFLOCK_DASHBOARD_DATA=FILE set, the service dashboard's series are written there as JSON
(scripts/render-dashboard.py draws docs/dashboard-service.png from it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kvflock.local.process import free_port
from tests.helm.metric_names import promql_metric_names

from .conftest import REPO, Cluster, wait_for
from .load import SteadyLoad

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMETHEUS = Path(sys.executable).parent / "prometheus"
DASHBOARDS = sorted((REPO / "helm" / "kvflock" / "dashboards").glob("*.json"))
SERVICE, NAMESPACE = "smollm2", "default"
# Grafana's variables, filled as a user looking at this service would have them.
VARIABLES = {"$__rate_interval": "30s", "$namespace": NAMESPACE, "$inferenceservice": SERVICE}
# Counters that have a series only once their event happened (labelled by what happened), which a
# short healthy run does not produce: for these the test checks that the metric is exported.
EVENT_ONLY = {"kvflock_router_refused_total", "kvflock_router_retries_total"}


def _targets(cluster: Cluster) -> list[dict[str, Any]]:
    """file_sd target groups: every worker and router pod, labelled as the PodMonitors relabel
    them (namespace, pod as instance, inferenceservice), and the operator."""
    groups = []
    for role in ("worker", "router"):
        pods = cluster.get("pods", None, "-l", f"kvflock.dev/service={SERVICE},kvflock.dev/role={role}")["items"]
        for pod in pods:
            endpoint = pod["metadata"]["annotations"]["kvflock.dev/endpoint"].removeprefix("http://")
            groups.append({"targets": [endpoint], "labels": {
                "job": f"kvflock-{role}s", "namespace": NAMESPACE, "pod": pod["metadata"]["name"],
                "instance": pod["metadata"]["name"], "inferenceservice": SERVICE}})
    operator = json.loads((cluster.state_dir / "cluster.json").read_text())["operatorMetrics"]
    groups.append({"targets": [operator.removeprefix("http://").removesuffix("/metrics")],
                   "labels": {"job": "kvflock-operator"}})
    return groups


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not PROMETHEUS.exists():
        pytest.skip(f"no prometheus at {PROMETHEUS}: run `make venv`")
    work = tmp_path_factory.mktemp("prometheus")
    service = yaml.safe_load((REPO / "examples" / "smollm2-demo.yaml").read_text())
    service["spec"]["engine"]["speculative"] = {"method": "ngram", "numTokens": 2}
    # One math thread: on two cores shared with the routers, the operator and Prometheus, a second
    # thread made every operation wait for both to be scheduled (0.6 s a request became 4-7 s).
    service["spec"]["resources"]["cpu"] = "1"
    (work / "service.json").write_text(json.dumps(service))
    cluster.kubectl("apply", "-f", str(work / "service.json"))

    def ready() -> bool:
        conditions = ((cluster.get("infsvc", SERVICE) or {}).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_for(ready, 180, "smollm2 Ready")
    targets = _targets(cluster)
    (work / "targets.json").write_text(json.dumps(targets))
    (work / "prometheus.yml").write_text(json.dumps({
        # Every 2 s: a 30 s rate window still holds many samples, and the scrapes of five processes
        # take less of the two cores the workers need.
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [{"job_name": "kvflock", "file_sd_configs": [{"files": [str(work / "targets.json")]}]}],
    }))
    port = free_port()
    log = open(work / "prometheus.log", "wb")
    process = subprocess.Popen([str(PROMETHEUS), f"--config.file={work / 'prometheus.yml'}",
                                f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GOMAXPROCS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        def all_up() -> bool:
            try:
                active = httpx.get(f"{url}/api/v1/targets").json()["data"]["activeTargets"]
            except (httpx.TransportError, ValueError, KeyError):
                return False
            return len(active) == len(targets) and all(t["health"] == "up" for t in active)

        wait_for(all_up, 60, "Prometheus to scrape the workers, the routers and the operator", interval=0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert reply["status"] == "success", f"{expr}: {reply}"
    return list(reply["data"]["result"])


def fill(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every panel target of every dashboard."""
    return [(path.stem, panel["title"], target["expr"]) for path in DASHBOARDS
            for panel in json.loads(path.read_text())["panels"] for target in panel.get("targets", [])]


def test_every_dashboard_panel_returns_data_from_the_local_cluster(cluster: Cluster, prometheus: str) -> None:
    url = cluster.get("infsvc", SERVICE)["status"]["url"]
    picture = os.environ.get("KVFLOCK_DASHBOARD_DATA")
    # One client, short answers: every panel needs only some requests. For the picture, a minute of
    # them, so that its rates and quantiles have a shape.
    started = time.monotonic()
    with SteadyLoad(url, clients=1, max_tokens=4) as load:
        wait_for(lambda: load.failures or (load.done >= 3 and (not picture or time.monotonic() - started > 60)),
                 180, "requests through the router")
    assert not load.failures, load.failures
    assert load.done >= 3
    time.sleep(5)  # a few more scrapes after the last request, so rates see it

    exported = {name for target in ("worker", "router", "operator") for name in _exported(cluster, target)}
    empty, unknown = [], []
    for dashboard, title, expr in panel_queries():
        names = promql_metric_names(expr)
        unknown += [f"{dashboard} / {title}: {name}" for name in sorted(names - exported)]
        if names & EVENT_ONLY:
            continue
        if not query(prometheus, fill(expr)):
            empty.append(f"{dashboard} / {title}: {fill(expr)}")
    assert unknown == [], "panels read metrics that nothing exports"
    assert empty == [], "panels without data"

    if picture:
        _write_series(prometheus, Path(picture))


def _exported(cluster: Cluster, role: str) -> set[str]:
    """The sample names (and the families of metrics without samples yet) a process serves."""
    groups = [g for g in _targets(cluster) if g["labels"]["job"] == f"kvflock-{role}s" or
              (role == "operator" and g["labels"]["job"] == "kvflock-operator")]
    names = set()
    for group in groups:
        text = httpx.get(f"http://{group['targets'][0]}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(" ", 3)
                # prometheus_client names a counter's family with its _total already
                names |= {family + s for s in {"counter": ("", "_total"), "histogram": ("_bucket", "_sum", "_count")}
                          .get(kind, ("",))}
            elif line and not line.startswith("#"):
                names.add(line.split("{")[0].split(" ")[0])
    return names


def _write_series(prometheus: str, target: Path) -> None:
    """The service dashboard's panels over the last minutes, as the dashboard would show them."""
    end = time.time()
    panels = []
    dashboard = json.loads((REPO / "helm" / "kvflock" / "dashboards" / "service.json").read_text())
    for panel in dashboard["panels"]:
        series = []
        for target_ in panel.get("targets", []):
            reply = httpx.get(f"{prometheus}/api/v1/query_range", params={
                "query": fill(target_["expr"]), "start": end - 120, "end": end, "step": "2s"}, timeout=30).json()
            for result in reply["data"]["result"]:
                label = target_.get("legendFormat") or target_["expr"][:40]
                for key, value in result["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                series.append({"label": label, "values": result["values"]})
        if series:
            panels.append({"title": panel["title"], "unit": (panel.get("fieldConfig") or {}).get("defaults", {})
                           .get("unit", ""), "series": series})
    target.write_text(json.dumps({"title": dashboard["title"], "panels": panels}))
