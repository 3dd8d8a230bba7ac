"""The operator's calls to a worker's HTTP endpoints (kvflock.worker.server): /ready, /metrics (its load, and
the LoRA adapters it serves), /admin/drain, /v1/load_lora_adapter and /v1/unload_lora_adapter (the last
three with the service's admin token when it has auth).

A worker is reached at its pod's IP and the container's `http` port. Where pods do not get
their own IP (the local cluster's process kubelet), the kubelet writes the address into the
pod's `kvflock.dev/endpoint` annotation and that wins.
"""

from __future__ import annotations

import datetime
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from kvflock.operator.reconcile import Probe
from kvflock.shared import metrics
from kvflock.shared.auth import bearer_header
from kvflock.shared.names import ANNOTATION_ENDPOINT, WORKER_PORT


def worker_url(pod: Mapping[str, Any]) -> str | None:
    """The base URL of a worker pod, or None while it has no address."""
    endpoint = (pod.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ENDPOINT)
    if endpoint:
        return endpoint.rstrip("/")
    ip = (pod.get("status") or {}).get("podIP")
    return f"http://{ip}:{WORKER_PORT}" if ip else None


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
    values = metrics.parse_samples(text) if metrics_code == 200 else {}
    total = values.get(metrics.KV_BLOCKS_TOTAL)
    used = values.get(metrics.KV_BLOCKS_USED)
    running = values.get(metrics.REQUESTS_RUNNING)
    waiting = values.get(metrics.REQUESTS_WAITING)
    cached = values.get(metrics.KV_BLOCKS_CACHED)
    return Probe(
        at=now,
        ready=ready_code == 200,
        running=int(running) if running is not None else None,
        waiting=int(waiting) if waiting is not None else None,
        kv_usage=round(used / total, 4) if used is not None and total else None,
        cached_blocks=int(cached) if cached is not None else None,
        drained=_drained(drain_text) if drain_code == 200 else None,
        error=None if metrics_code == 200 else f"/metrics answered {metrics_code}",
        ttft_buckets=metrics.parse_histogram_buckets(text, metrics.TIME_TO_FIRST_TOKEN) if metrics_code == 200 else (),
        adapters=metrics.parse_lora_adapters(text) if metrics_code == 200 else None,
    )


def read_held(url: str, timeout: float) -> int | None:
    """The requests a router holds while no replica can take them (None: it did not say)."""
    try:
        code, text = _get(f"{url}/metrics", timeout)
    except (OSError, ValueError):
        return None
    held = metrics.parse_samples(text).get(metrics.ROUTER_HELD_REQUESTS) if code == 200 else None
    return int(held) if held is not None else None


def _drained(text: str) -> bool | None:
    """The `drained` flag of GET /admin/drain's answer."""
    try:
        value = json.loads(text).get("drained")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def _post_json(url: str, body: dict[str, str], timeout: float, admin_token: bytes | None) -> str | None:
    """POST `body`; None when it succeeded, else why not (the worker's error message when it gave one)."""
    headers = {**_headers(admin_token), "Content-Type": "application/json"}
    request = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        try:
            return str(json.loads(exc.read())["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return f"it answered {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url} unreachable: {exc}"


def load_adapter(url: str, name: str, path: str, timeout: float, admin_token: bytes | None = None) -> str | None:
    """Ask a worker to serve the adapter folder `path` as `name`; returns why that failed, or None."""
    return _post_json(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, timeout, admin_token)


def unload_adapter(url: str, name: str, timeout: float, admin_token: bytes | None = None) -> str | None:
    """Ask a worker to stop serving the adapter `name`; returns why that failed, or None."""
    return _post_json(f"{url}/v1/unload_lora_adapter", {"lora_name": name}, timeout, admin_token)


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
