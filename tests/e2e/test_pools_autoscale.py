"""Length pools and the autoscaler in the local cluster (`kvflock up`, the real kubectl).

The workers serve the tiny random Llama (token-id prompts, so the router knows each prompt's
exact length). Length pools: short and long prompts land on their own pool's workers, which
the operator deployed with the pool's settings. Autoscaler: a synthetic load raises the
replicas to max, and once it stops they come down to min, without flapping (the windows are
seconds long; the replica count is recorded over time).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import Cluster, wait_for
from .load import Answer, SteadyLoad

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _apply(cluster: Cluster, name: str, spec: dict[str, Any]) -> None:
    manifest = {"apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": name},
                "spec": spec}
    path = cluster.state_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    cluster.kubectl("apply", "-f", str(path))


def _tiny_spec(model: Path, **fields: Any) -> dict[str, Any]:
    return {
        "model": {"source": "path", "path": str(model), "format": "hf", "servedName": "tiny"},
        "engine": {"dtype": "float32", "maxModelLen": 256, "maxNumSeqs": 8, "maxNumBatchedTokens": 256},
        "resources": {"gpusPerReplica": 0, "cpu": "1", "memory": "1Gi"},
        "probes": {"periodSeconds": 1, "startupSeconds": 120},
        "drainTimeoutSeconds": 10,
        **fields,
    }


def _status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (cluster.get("infsvc", name) or {}).get("status") or {}


def _ready(cluster: Cluster, name: str) -> bool:
    conditions = _status(cluster, name).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _complete(url: str, prompt_tokens: int, max_tokens: int = 2) -> httpx.Response:
    prompt = [(i * 7) % 250 + 1 for i in range(prompt_tokens)]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def _requests_served(worker: dict[str, Any]) -> float:
    text = httpx.get(f"{worker['metadata']['annotations']['kvflock.dev/endpoint']}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("kvflock_requests_total{"))


def test_short_and_long_prompts_land_in_their_pools(cluster: Cluster, tiny_models: dict[str, Path]) -> None:
    pools = [
        {"name": "short", "maxPromptTokens": 64, "replicas": 1, "engine": {"maxModelLen": 128}},
        {"name": "long", "minPromptTokens": 64, "replicas": 1},
    ]
    _apply(cluster, "pooled", _tiny_spec(tiny_models["llama"], router={"pools": pools}))
    wait_for(lambda: _ready(cluster, "pooled"), 180, "the pooled service to be Ready")
    workers = {p["metadata"]["labels"]["kvflock.dev/pool"]: p for p in cluster.workers("pooled")}
    assert sorted(p["metadata"]["name"] for p in workers.values()) == ["pooled-long-w-0", "pooled-short-w-0"]
    short_url = workers["short"]["metadata"]["annotations"]["kvflock.dev/endpoint"]
    assert httpx.get(f"{short_url}/v1/models", timeout=10).json()["data"][0]["max_model_len"] == 128

    url = _status(cluster, "pooled")["url"]
    answered = {"short": [_complete(url, 16) for _ in range(3)], "long": [_complete(url, 160) for _ in range(3)]}
    for pool, answers in answered.items():
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert {a.headers["x-kvflock-replica"] for a in answers} == {f"pooled-{pool}-w-0"}
        assert _requests_served(workers[pool]) == 3, f"the {pool} pool's worker counts its own requests"
    cluster.kubectl("delete", "infsvc", "pooled", "--timeout=60s")


def _completion(url: str) -> Answer:
    """One completion of the autoscaler test's load; raises on anything but 200."""
    answer = _complete(url, 32, max_tokens=96)
    if answer.status_code != 200:
        raise AssertionError(f"{answer.status_code}: {answer.text}")
    return Answer(time.monotonic(), answer.headers.get("x-kvflock-replica", ""))


def _direction_changes(trace: list[int]) -> int:
    steps = [b - a for a, b in zip(trace, trace[1:], strict=False) if b != a]
    return sum(1 for a, b in zip(steps, steps[1:], strict=False) if (a > 0) != (b > 0))


def test_autoscaler_rises_to_max_under_load_and_returns_to_min_without_flapping(
        cluster: Cluster, tiny_models: dict[str, Path]) -> None:
    scaling = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "metric": "queueDepth", "target": 1,
               "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 20}
    _apply(cluster, "elastic", _tiny_spec(tiny_models["llama"], replicas=1, autoscaling=scaling))
    wait_for(lambda: _ready(cluster, "elastic"), 180, "the elastic service to be Ready")
    url = _status(cluster, "elastic")["url"]

    trace: list[int] = []
    recording = threading.Event()

    def record() -> None:
        while not recording.is_set():
            spec = (cluster.get("infsvc", "elastic") or {}).get("spec") or {}
            if "replicas" in spec and (not trace or trace[-1] != spec["replicas"]):
                trace.append(int(spec["replicas"]))
            recording.wait(0.5)

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    try:
        with SteadyLoad(url, clients=6, send=lambda _: _completion(url)) as load:
            started = time.monotonic()
            wait_for(lambda: trace and trace[-1] == 3, 120, "the autoscaler to reach maxReplicas", interval=0.5)
            print(f"\nautoscaler: 1 -> 3 replicas {time.monotonic() - started:.1f}s into the load")
            wait_for(lambda: _status(cluster, "elastic").get("readyReplicas") == 3, 120, "3 ready replicas")
        assert not load.failures, load.failures[:5]
        stopped = time.monotonic()
        wait_for(lambda: trace[-1] == 1, 90, "the autoscaler to return to minReplicas", interval=0.5)
        print(f"autoscaler: back to 1 replica {time.monotonic() - stopped:.1f}s after the load stopped; "
              f"replicas over time: {trace}")
        wait_for(lambda: len(cluster.workers("elastic")) == 1, 60, "the surplus workers to be drained and removed")
    finally:
        recording.set()
        recorder.join(timeout=10)
    assert trace[0] == 1 and max(trace) == 3 and trace[-1] == 1
    assert _direction_changes(trace) == 1, f"the replicas flapped: {trace}"
    events = cluster.kubectl("get", "events", "--field-selector", "involvedObject.name=elastic")
    assert "Autoscaled" in events, events
    # The decision reaches the status in a write after the one of the replicas.
    decision = wait_for(lambda: (d := _status(cluster, "elastic").get("autoscaler") or {}).get("desiredReplicas") == 1
                        and d, 30, "the autoscaler's last decision in the status")
    assert decision["metric"] == "queueDepth"
    cluster.kubectl("delete", "infsvc", "elastic", "--timeout=60s")
