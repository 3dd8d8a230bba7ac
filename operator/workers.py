"""The operator's calls to a worker's HTTP endpoints (kvflock.worker.server): /ready, /metrics, /admin/drain
(the latter with the service's admin token when it has auth).

A worker is reached at its pod's IP and the container's `http` port. Where pods do not get
their own IP (the local cluster's process kubelet), the kubelet writes the address into the
pod's `kvflock.dev/endpoint` annotation and that wins.
"""

from __future__ import annotations

import datetime
import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from kvflock.operator.children import ANNOTATION_ENDPOINT, WORKER_PORT
from kvflock.operator.reconcile import Probe
from kvflock.worker.auth import bearer_header

# The worker's Prometheus metrics that the operator reads (kvflock.worker.metrics exports them).
METRIC_RUNNING = "kvflock_requests_running"
METRIC_WAITING = "kvflock_requests_waiting"
METRIC_KV_USED = "kvflock_kv_blocks_used"
METRIC_KV_TOTAL = "kvflock_kv_blocks_total"

# kvflock.worker.metrics' TTFT histogram, and the router's held requests (kvflock.worker.router.metrics).
METRIC_TTFT = "kvflock_time_to_first_token_seconds"
METRIC_HELD = "kvflock_router_held_requests"

_BUCKET = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)_bucket\{[^}]*le="(?P<le>[^"]+)"[^}]*\}\s+(?P<value>\S+)',
                     re.MULTILINE)
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


def _headers(admin_token: bytes | None) -> dict[str, str]:
    return {"Authorization": bearer_header(admin_token)} if admin_token else {}


def _get(url: str, timeout: float, admin_token: bytes | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=_headers(admin_token)),
                                    timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def probe(url: str, timeout: float, draining: bool = False, admin_token: bytes | None = None) -> Probe:
    """Read /ready and /metrics once (and GET /admin/drain of a draining worker, with the
    admin token where the service has auth).

    A failure is recorded in the probe, never raised.
    """
    now = datetime.datetime.now(tz=datetime.UTC)
    try:
        ready_code, _ = _get(f"{url}/ready", timeout)
        metrics_code, text = _get(f"{url}/metrics", timeout)
        drain_code, drain_text = _get(f"{url}/admin/drain", timeout, admin_token) if draining else (0, "")
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
        ttft_buckets=parse_buckets(text, METRIC_TTFT) if metrics_code == 200 else (),
    )


def parse_buckets(text: str, histogram: str) -> tuple[tuple[float, float], ...]:
    """A Prometheus histogram's cumulative buckets as (upper bound, count), by bound."""
    buckets = []
    for match in _BUCKET.finditer(text):
        if match["name"] == histogram:
            try:
                buckets.append((float(match["le"]), float(match["value"])))
            except ValueError:
                continue
    return tuple(sorted(buckets))


def read_held(url: str, timeout: float) -> int | None:
    """The requests a router holds while no replica can take them (None: it did not say)."""
    try:
        code, text = _get(f"{url}/metrics", timeout)
    except (OSError, ValueError):
        return None
    held = parse_metrics(text).get(METRIC_HELD) if code == 200 else None
    return int(held) if held is not None else None


def _drained(text: str) -> bool | None:
    """The `drained` flag of GET /admin/drain's answer."""
    try:
        value = json.loads(text).get("drained")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def request_drain(url: str, timeout: float, admin_token: bytes | None = None) -> str | None:
    """Ask a worker to stop taking requests; returns why that failed, or None."""
    request = urllib.request.Request(f"{url}/admin/drain", method="POST", data=b"", headers=_headers(admin_token))
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return f"/admin/drain answered {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url} unreachable: {exc}"
