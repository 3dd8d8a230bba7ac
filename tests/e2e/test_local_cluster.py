"""The whole system on one machine: `kvflock up`, the real kubectl, worker processes, the router.

The tests share one cluster and run in order, as a user's session would: apply, ask, scale
out and in, lose a worker, apply a broken service, delete everything.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import openai
import pytest

from .conftest import REPO, Cluster, wait_for
from .load import SteadyLoad

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SERVICE = "smollm2"
QUESTION = "What is the capital of France?"


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def _ready_replicas(cluster: Cluster) -> int:
    service = cluster.get("infsvc", SERVICE)
    return int(((service or {}).get("status") or {}).get("readyReplicas") or 0)


def _pod_ready(pod: dict[str, Any]) -> bool:
    return _condition(pod, "Ready").get("status") == "True"


def _pid(pod: dict[str, Any]) -> int:
    container = pod["status"]["containerStatuses"][0]
    return int(container["containerID"].removeprefix("process://"))


def _listening(endpoint: str) -> bool:
    host, port = endpoint.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _client(cluster: Cluster) -> openai.OpenAI:
    url = cluster.get("infsvc", SERVICE)["status"]["url"]
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client: openai.OpenAI, prompt: str = QUESTION, max_tokens: int = 24) -> str:
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens, temperature=0,
    )
    return reply.choices[0].message.content or ""


def test_applied_smollm2_becomes_ready_and_answers_through_the_router(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", str(REPO / "examples" / "smollm2-demo.yaml"))
    started = time.monotonic()
    wait_for(lambda: _condition(cluster.get("infsvc", SERVICE), "Ready").get("status") == "True", 180, "Ready")
    print(f"\nsmollm2 Ready {time.monotonic() - started:.1f}s after kubectl apply")

    table = cluster.kubectl("get", "infsvc")
    url = f"http://127.0.0.1:{cluster.router_port}"
    assert url in wait_for(lambda: url in cluster.kubectl("get", "infsvc") and cluster.kubectl("get", "infsvc"),
                           30, "the router's URL in kubectl get"), table
    assert "Paris" in _chat(_client(cluster))


def test_scale_to_three_then_back_to_one_drains_the_removed_workers(cluster: Cluster) -> None:
    cluster.kubectl("scale", f"infsvc/{SERVICE}", "--replicas", "3")
    wait_for(lambda: _ready_replicas(cluster) == 3, 180, "3 ready replicas")
    workers = cluster.workers(SERVICE)
    endpoints = {p["metadata"]["annotations"]["kvflock.dev/endpoint"] for p in workers}
    pids = {_pid(p) for p in workers}
    assert len(endpoints) == 3 and len(pids) == 3 and all(map(_alive, pids))
    client = _client(cluster)
    assert all("Paris" in _chat(client) for _ in range(3))

    url = cluster.get("infsvc", SERVICE)["status"]["url"]
    with SteadyLoad(url, clients=2, max_tokens=16) as load:
        wait_for(lambda: load.done >= 2, 60, "requests under way")
        cluster.kubectl("scale", f"infsvc/{SERVICE}", "--replicas", "1")
        wait_for(lambda: len(cluster.workers(SERVICE)) == 1, 120, "scale down to 1 worker")
        served_before = load.done
        wait_for(lambda: load.done >= served_before + 2, 60, "requests after the scale-down")
    assert not load.failures, load.failures
    print(f"\n{load.done} requests during scale-down, none failed")

    remaining = {p["metadata"]["annotations"]["kvflock.dev/endpoint"] for p in cluster.workers(SERVICE)}
    removed = endpoints - remaining
    assert len(removed) == 2
    events = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={SERVICE}")
    assert events.count("Draining worker") >= 2, events
    wait_for(lambda: not any(_listening(e) for e in removed), 60, "the removed workers to stop listening")


def test_a_killed_worker_is_restarted_and_ready_again(cluster: Cluster) -> None:
    (pod,) = cluster.workers(SERVICE)
    name, pid = pod["metadata"]["name"], _pid(pod)
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def recovered() -> bool:
        current = cluster.get("pod", name)
        if not current or not _pod_ready(current):
            return False
        return current["status"]["containerStatuses"][0]["restartCount"] > restarts or _pid(current) != pid

    wait_for(recovered, 120, "the killed worker to be Ready again", interval=0.2)
    wait_for(lambda: _ready_replicas(cluster) == 1, 30, "the service to be Ready again", interval=0.2)
    print(f"\nrecovery: {time.monotonic() - killed:.1f}s from SIGKILL to the service Ready again")
    assert "Paris" in _chat(_client(cluster))


def test_a_bad_service_is_degraded_with_the_reason_and_an_event(cluster: Cluster) -> None:
    bad = """
apiVersion: kvflock.dev/v1alpha1
kind: InferenceService
metadata: {name: broken}
spec:
  model: {source: path, path: /nonexistent/model.gguf, format: gguf}
  resources: {gpusPerReplica: 0, cpu: "1", memory: 1Gi}
  probes: {startupSeconds: 60}
"""
    manifest = cluster.state_dir / "broken.yaml"
    manifest.write_text(bad)
    cluster.kubectl("apply", "-f", str(manifest))

    def degraded() -> dict[str, Any]:
        condition = _condition(cluster.get("infsvc", "broken"), "Degraded")
        return condition if condition.get("status") == "True" else {}

    condition = wait_for(degraded, 120, "broken to be Degraded")
    # The local cluster's operator sees the workers' files, so it finds the missing model before any pod.
    assert condition["reason"] == "InvalidModel" and "/nonexistent/model.gguf" in condition["message"], condition
    assert "/nonexistent/model.gguf" in cluster.kubectl("get", "infsvc", "broken", "-o", "yaml")
    events = cluster.kubectl("get", "events", "--field-selector", "involvedObject.name=broken")
    assert "InvalidModel" in events and "/nonexistent/model.gguf" in events, events
    assert cluster.workers("broken") == []

    assert "Paris" in _chat(_client(cluster)), "the operator and the good service keep working"
    cluster.kubectl("delete", "infsvc", "broken", "--timeout=60s")


def test_delete_ends_every_process_and_leaves_nothing_listening(cluster: Cluster) -> None:
    pods = cluster.workers(SERVICE)
    pids = [_pid(p) for p in pods]
    endpoints = [p["metadata"]["annotations"]["kvflock.dev/endpoint"] for p in pods]
    router = f"http://127.0.0.1:{cluster.router_port}"
    cluster.kubectl("delete", "-f", str(REPO / "examples" / "smollm2-demo.yaml"), "--timeout=60s")

    wait_for(lambda: not any(map(_alive, pids)), 60, "the worker processes to end")
    wait_for(lambda: not any(_listening(e) for e in [*endpoints, router]), 30, "the ports to close")
    assert cluster.get("infsvc", SERVICE) is None
    assert cluster.workers(SERVICE) == []
    wait_for(lambda: not list((cluster.state_dir / "pids").glob("*")), 30, "no process left")
