"""Discovery of an InferenceService's worker Pods through the Kubernetes API (the emulator on
127.0.0.1): endpoints from the annotation or podIP, readiness from the Ready condition, pools
from the label and the engine ConfigMap, and pods leaving or draining."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import kubernetes.client
import pytest

from kvflock.router.app import create_app
from kvflock.router.discovery import KubernetesDiscovery, endpoint_from_pod, parse_worker_flag
from kvflock.router.policy import Pool
from tests.operator.conftest import ServerThread
from tests.router.conftest import MODEL, metric, token_prompt, wait_for
from tests.server.conftest import free_port, running_server

NAMESPACE = "default"


def pod(name: str, url: str | None, ready: bool = True, pool: str = "default", ip: str | None = None,
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    notes = dict(annotations or {})
    if url:
        notes["kvflock.dev/endpoint"] = url.removeprefix("http://")
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "annotations": notes,
                     "labels": {"kvflock.dev/service": "svc", "kvflock.dev/role": "worker", "kvflock.dev/pool": pool}},
        "spec": {"containers": [{"name": "worker", "image": "kvflock"}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_a_pod_endpoint_comes_from_its_annotation_else_its_ip():
    annotated = endpoint_from_pod(pod("w-0", "http://127.0.0.1:9001", pool="long"))
    assert (annotated.url, annotated.pool, annotated.pod_ready) == ("http://127.0.0.1:9001", "long", True)
    by_ip = endpoint_from_pod(pod("w-1", None, ready=False, ip="10.0.0.7"))
    assert (by_ip.url, by_ip.pod_ready) == ("http://10.0.0.7:8000", False)
    starting = endpoint_from_pod(pod("w-2", None))
    assert (starting.url, starting.pod_ready, starting.may_become_ready) == ("", False, True)
    draining = endpoint_from_pod(pod("w-3", "127.0.0.1:1", annotations={"kvflock.dev/draining-since": "now"}))
    assert draining.terminating


@pytest.mark.parametrize("state", [
    {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
    {"waiting": {"reason": "ImagePullBackOff"}},
    {"terminated": {"exitCode": 1, "reason": "Error"}},
])
def test_a_crash_looping_or_stuck_pod_is_not_coming(state):
    manifest = pod("w-0", "127.0.0.1:1", ready=False)
    manifest["status"]["containerStatuses"] = [{"name": "worker", "restartCount": 2, "state": state}]
    assert not endpoint_from_pod(manifest).may_become_ready


def test_a_failed_pod_is_not_coming_and_a_restarting_one_is():
    failed = pod("w-0", "127.0.0.1:1", ready=False)
    failed["status"]["phase"] = "Failed"
    assert not endpoint_from_pod(failed).may_become_ready
    restarting = pod("w-1", "127.0.0.1:2", ready=False)
    restarting["status"]["containerStatuses"] = [{"name": "worker", "restartCount": 1, "state": {"running": {}}}]
    assert endpoint_from_pod(restarting).may_become_ready


def test_worker_flags_name_an_optional_pool():
    assert parse_worker_flag("http://h:1/").url == "http://h:1"
    assert parse_worker_flag("long=http://h:1").pool == "long"
    with pytest.raises(ValueError, match="POOL"):
        parse_worker_flag("h:1")


def create_pod(core: kubernetes.client.CoreV1Api, manifest: dict[str, Any]) -> None:
    """Create the pod, then write its status as a kubelet would (create ignores status)."""
    core.create_namespaced_pod(NAMESPACE, manifest)
    core.patch_namespaced_pod_status(manifest["metadata"]["name"], NAMESPACE, {"status": manifest["status"]})


@pytest.fixture
def core() -> Iterator[kubernetes.client.CoreV1Api]:
    server = ServerThread()
    server.start()
    configuration = kubernetes.client.Configuration()
    configuration.host = server.url
    with kubernetes.client.ApiClient(configuration) as api:
        yield kubernetes.client.CoreV1Api(api)
    server.stop()


def test_the_router_follows_the_services_pods_and_configmap(core, start_worker):
    short, long = start_worker().url, start_worker().url
    router_json = {"policy": "prefix-aware", "holdTimeoutSeconds": 0,  # refuse at once: no replica to wait for
                   "pools": [{"name": "short", "maxPromptTokens": 64}, {"name": "long", "minPromptTokens": 64}],
                   "blockSize": 16}
    core.create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "svc-engine"},
                                                  "data": {"router.json": json.dumps(router_json)}})
    create_pod(core, pod("svc-w-0", short, pool="short"))
    create_pod(core, pod("svc-w-1", long, pool="long", ready=False))
    other = pod("other-w-0", long)
    other["metadata"]["labels"]["kvflock.dev/service"] = "other"
    create_pod(core, other)

    discovery = KubernetesDiscovery("svc", NAMESPACE, core.api_client)
    app = create_app(discovery)
    state = app.state.router
    with running_server(app, free_port()) as url:
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, what="the router to be ready")
        assert sorted(state.fleet.replicas) == ["svc-w-0", "svc-w-1"]
        assert state.router.pools == (Pool("short", 0, 64), Pool("long", 64, None))

        def answer(prefix_tokens: int) -> httpx.Response:
            body = {"model": MODEL, "prompt": token_prompt(1, 1, prefix_tokens=prefix_tokens), "max_tokens": 2}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=60)

        assert answer(200).status_code == 503  # the long pool's only pod is not Ready
        assert answer(16).headers["x-kvflock-replica"] == "svc-w-0"

        core.patch_namespaced_pod_status(
            "svc-w-1", NAMESPACE, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
        wait_for(lambda: answer(200).status_code == 200, what="the long pod to turn Ready")
        assert answer(200).headers["x-kvflock-replica"] == "svc-w-1"

        core.patch_namespaced_pod("svc-w-0", NAMESPACE,
                                  {"metadata": {"annotations": {"kvflock.dev/draining-since": "2026-01-01T00:00:00Z"}}})
        wait_for(lambda: metric(url, "kvflock_router_replicas", state="draining") == 1, what="the drain mark")
        core.delete_namespaced_pod("svc-w-1", NAMESPACE)
        wait_for(lambda: "svc-w-1" not in state.fleet.replicas, what="the deleted pod to leave")
        assert answer(16).status_code == 503
