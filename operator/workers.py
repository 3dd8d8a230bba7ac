"""The operator's calls to a worker's HTTP endpoints (kvfleet.worker.server): /ready, /metrics, /admin/drain.

A worker is reached at its pod's IP and the container's `http` port. Where pods do not get
their own IP (the local cluster's process kubelet), the kubelet writes the address into the
pod's `kvfleet.dev/endpoint` annotation and that wins.
"""

from __future__ import annotations

import datetime
import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from kvfleet.operator.children import ANNOTATION_ENDPOINT, WORKER_PORT
from kvfleet.operator.reconcile import Probe

# The worker's Prometheus metrics that the operator reads (kvfleet.worker.metrics exports them).
METRIC_RUNNING = "kvfleet_requests_running"
METRIC_WAITING = "kvfleet_requests_waiting"
METRIC_KV_USED = "kvfleet_kv_blocks_used"
METRIC_KV_TOTAL = "kvfleet_kv_blocks_total"

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")


def worker_url(pod: Mapping[str, Any]) -> str | None:
    """The base URL of a worker pod, or None while it has no address."""
    endpoint = (pod.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ENDPOINT)
    if endpoint:
        return endpoint.rstrip("/")
    ip = (pod.get("status") or {}).get("podIP")
    return f"http://{ip}:{WORKER_PORT}" if ip else None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: sum over its label sets}."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        totals[match["name"]] = totals.get(match["name"], 0.0) + value
    return totals


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def probe(url: str, timeout: float, draining: bool = False) -> Probe:
    """Read /ready and /metrics once (and GET /admin/drain of a draining worker).

    A failure is recorded in the probe, never raised.
    """
    now = datetime.datetime.now(tz=datetime.UTC)
    try:
        ready_code, _ = _get(f"{url}/ready", timeout)
        metrics_code, text = _get(f"{url}/metrics", timeout)
        drain_code, drain_text = _get(f"{url}/admin/drain", timeout) if draining else (0, "")
    except (OSError, ValueError) as exc:
        return Probe(at=now, error=f"{url} unreachable: {exc}")
    metrics = parse_metrics(text) if metrics_code == 200 else {}
    total = metrics.get(METRIC_KV_TOTAL)
    used = metrics.get(METRIC_KV_USED)
    running = metrics.get(METRIC_RUNNING)
    waiting = metrics.get(METRIC_WAITING)
    return Probe(
        at=now,
        ready=ready_code == 200,
        running=int(running) if running is not None else None,
        waiting=int(waiting) if waiting is not None else None,
        kv_usage=round(used / total, 4) if used is not None and total else None,
        drained=_drained(drain_text) if drain_code == 200 else None,
        error=None if metrics_code == 200 else f"/metrics answered {metrics_code}",
    )


def _drained(text: str) -> bool | None:
    """The `drained` flag of GET /admin/drain's answer."""
    try:
        value = json.loads(text).get("drained")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def request_drain(url: str, timeout: float) -> str | None:
    """Ask a worker to stop taking requests; returns why that failed, or None."""
    request = urllib.request.Request(f"{url}/admin/drain", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return f"/admin/drain answered {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url} unreachable: {exc}"
