"""The real operator under kopf against the API server on 127.0.0.1, driven with the kubernetes client.

The test plays the kubelet: it marks pods running and ready, and points each at a fake
worker endpoint (`kvflock.dev/endpoint`, as the local cluster's process kubelet does).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException
from kvflock.operator.handlers import OperatorOptions
from kvflock.operator.runner import run_operator

from .conftest import FakeWorkers, ServerThread, wait_for

pytestmark = pytest.mark.timeout(60)

GROUP, VERSION, PLURAL, NS = "kvflock.dev", "v1alpha1", "inferenceservices", "default"
MERGE = "application/merge-patch+json"
SELECTOR = "kvflock.dev/service={name},kvflock.dev/role=worker"


@pytest.fixture
def operator(apiserver: ServerThread, kube_config: kubernetes.client.Configuration) -> Iterator[None]:
    """The operator in its own thread and event loop, as a separate process would be.

    (Sharing the API server's loop would make kopf wait for the server's tasks when it stops.)
    """
    stop, ready = threading.Event(), threading.Event()
    options = OperatorOptions(probe_interval=0.5, probe_timeout=0.5, retry_backoff=0.5)
    coroutine = run_operator(kube_config, namespaces=[NS], options=options, stop_flag=stop, ready_flag=ready)
    thread = threading.Thread(target=asyncio.run, args=(coroutine,), daemon=True)
    thread.start()
    assert ready.wait(timeout=10), "the operator did not start"
    yield
    stop.set()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the operator did not stop"


class Cluster:
    """The test's side: the kubernetes client, plus the kubelet's part."""

    def __init__(self, api_client: kubernetes.client.ApiClient, workers: FakeWorkers) -> None:
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.policy = kubernetes.client.PolicyV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.workers = workers

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "metadata": {"name": name},
                "spec": spec}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

    def service(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        patch = {"spec": spec}
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, patch, _content_type=MERGE)

    def pods(self, name: str) -> dict[str, Any]:
        pods = self.core.list_namespaced_pod(NS, label_selector=SELECTOR.format(name=name)).items
        return {p.metadata.name: p for p in pods}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conditions = (self.service(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == kind), {})

    def events(self, reason: str) -> list[str]:
        return [e.message for e in self.core.list_namespaced_event(NS).items if e.reason == reason]

    def run_pods(self, name: str) -> bool:
        """The kubelet: start every pod of the service (workers and router) that is not running yet."""
        every_pod = self.core.list_namespaced_pod(NS, label_selector=f"kvflock.dev/service={name}").items
        for pod_name, pod in {p.metadata.name: p for p in every_pod}.items():
            if pod.status and pod.status.phase == "Running":
                continue
            endpoint = {"kvflock.dev/endpoint": f"{self.workers.url}/{pod_name}"}
            self.core.patch_namespaced_pod(pod_name, NS, {"metadata": {"annotations": endpoint}}, _content_type=MERGE)
            status = {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
            self.core.patch_namespaced_pod_status(pod_name, NS, {"status": status}, _content_type=MERGE)
        return True

    def wait_ready(self, name: str, replicas: int) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            self.run_pods(name)
            status = self.service(name).get("status") or {}
            settled = status.get("readyReplicas") == replicas and len(self.pods(name)) == replicas
            return status if settled and self.condition(name, "Ready").get("status") == "True" else None

        return wait_for(ready, timeout=30, what=f"{name} to have {replicas} ready replicas")


@pytest.fixture
def cluster(operator: None, api_client: kubernetes.client.ApiClient, fake_workers: FakeWorkers) -> Cluster:
    return Cluster(api_client, fake_workers)


CPU_SPEC = {"replicas": 2, "resources": {"gpusPerReplica": 0}, "drainTimeoutSeconds": 20}


def test_created_service_gets_pods_services_and_configmap_with_owner_references(cluster: Cluster) -> None:
    uid = cluster.create("chat", CPU_SPEC)["metadata"]["uid"]
    pods = wait_for(lambda: len(cluster.pods("chat")) == 2 and cluster.pods("chat"), what="2 worker pods")
    assert sorted(pods) == ["chat-w-0", "chat-w-1"]
    children = [
        *pods.values(),
        cluster.core.read_namespaced_service("chat", NS),
        cluster.core.read_namespaced_service("chat-workers", NS),
        cluster.core.read_namespaced_config_map("chat-engine", NS),
        cluster.policy.read_namespaced_pod_disruption_budget("chat", NS),
    ]
    for child in children:
        (ref,) = child.metadata.owner_references
        assert (ref.kind, ref.name, ref.uid, ref.controller) == ("InferenceService", "chat", uid, True)
    assert cluster.service("chat")["metadata"]["finalizers"] == ["kvflock.dev/finalizer"]
    wait_for(lambda: cluster.events("ScaledUp"), what="the ScaledUp events")


def test_ready_pods_make_the_service_ready_with_its_status(cluster: Cluster) -> None:
    cluster.create("chat", CPU_SPEC)
    status = cluster.wait_ready("chat", 2)
    assert status["replicas"] == 2
    assert status["selector"] == SELECTOR.format(name="chat")
    assert status["url"] == "http://chat.default.svc.cluster.local"
    assert status["observedGeneration"] == 1
    wait_for(lambda: all(w.get("kvCacheUsage") == 0.25 for w in cluster.service("chat")["status"]["workers"]),
             what="the workers' metrics in status")


def test_scale_subresource_adds_and_drains_workers(cluster: Cluster) -> None:
    cluster.create("chat", CPU_SPEC)
    cluster.wait_ready("chat", 2)
    cluster.custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "chat", {"spec": {"replicas": 3}},
                                                        _content_type=MERGE)
    cluster.wait_ready("chat", 3)
    scale = cluster.custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "chat")
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (3, 3)

    # A request in flight on every worker (equal loads: the highest index goes) holds the drained one.
    cluster.workers.busy.update({"chat-w-0": 1, "chat-w-1": 1, "chat-w-2": 1})
    cluster.custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "chat", {"spec": {"replicas": 2}},
                                                        _content_type=MERGE)
    wait_for(lambda: "chat-w-2" in cluster.workers.drained, what="the drain call")
    wait_for(lambda: cluster.service("chat")["status"]["workers"][-1].get("draining"), what="draining in status")
    assert "chat-w-2" in cluster.pods("chat"), "a worker with a request in flight was deleted"
    cluster.workers.busy["chat-w-2"] = 0
    wait_for(lambda: "chat-w-2" not in cluster.pods("chat"), what="the drained worker to go")
    assert sorted(cluster.pods("chat")) == ["chat-w-0", "chat-w-1"]


def test_deleted_pod_is_replaced(cluster: Cluster) -> None:
    cluster.create("chat", CPU_SPEC)
    cluster.wait_ready("chat", 2)
    old_uid = cluster.pods("chat")["chat-w-0"].metadata.uid
    cluster.core.delete_namespaced_pod("chat-w-0", NS)
    replaced = wait_for(
        lambda: len(cluster.pods("chat")) == 2 and {p.metadata.uid for p in cluster.pods("chat").values()} != {old_uid},
        timeout=10, what="a replacement pod",
    )
    assert replaced
    cluster.wait_ready("chat", 2)


def test_failed_pod_is_replaced_and_reported(cluster: Cluster) -> None:
    cluster.create("chat", CPU_SPEC)
    cluster.wait_ready("chat", 2)
    cluster.core.patch_namespaced_pod_status("chat-w-1", NS, {"status": {"phase": "Failed", "conditions": []}},
                                             _content_type=MERGE)
    wait_for(lambda: cluster.events("Replaced"), timeout=10, what="the Replaced event")
    status = cluster.wait_ready("chat", 2)
    assert "chat-w-1" not in [w["name"] for w in status["workers"]]


def test_spec_change_rolls_the_workers_one_at_a_time(cluster: Cluster) -> None:
    cluster.create("chat", CPU_SPEC)
    old_hash = cluster.wait_ready("chat", 2)["specHash"]
    cluster.patch_spec("chat", {"engine": {"maxNumSeqs": 8}})
    most = 0

    def rolled() -> bool:
        nonlocal most
        pods = cluster.pods("chat")
        most = max(most, len(pods))
        cluster.run_pods("chat")
        hashes = {p.metadata.annotations["kvflock.dev/spec-hash"] for p in pods.values()}
        return len(pods) == 2 and old_hash not in hashes

    wait_for(rolled, timeout=90, what="all workers on the new spec")
    assert most == 3, "the rollout should surge exactly one worker"
    status = cluster.wait_ready("chat", 2)
    assert status["specHash"] != old_hash and status["updatedReplicas"] == 2
    assert cluster.events("RollingUpdate")


def test_deleted_service_takes_its_children_with_it(cluster: Cluster) -> None:
    cluster.create("chat", CPU_SPEC)
    cluster.wait_ready("chat", 2)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "chat")

    def gone() -> bool:
        try:
            cluster.service("chat")
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, what="the service to be deleted")
    assert cluster.pods("chat") == {}
    assert [s.metadata.name for s in cluster.core.list_namespaced_service(NS).items] == []
    assert [c.metadata.name for c in cluster.core.list_namespaced_config_map(NS).items] == []


def test_a_model_that_cannot_run_is_degraded_with_the_field_named_and_gets_no_pods(cluster: Cluster) -> None:
    cluster.create("split", {"replicas": 1, "engine": {"tensorParallelSize": 2}, "resources": {"gpusPerReplica": 0}})
    degraded = wait_for(lambda: cluster.condition("split", "Degraded").get("reason") == "InvalidModel"
                        and cluster.condition("split", "Degraded"), what="Degraded/InvalidModel")
    assert degraded["status"] == "True"
    assert degraded["message"].startswith(
        "engine.tensorParallelSize: 2 does not divide the model's num_heads=9"), degraded["message"]
    assert any("num_heads=9" in m for m in cluster.events("InvalidModel"))
    assert cluster.pods("split") == {}


@pytest.mark.unvalidated_crd  # the API server would refuse the spec; the operator's own check is tested
def test_invalid_spec_is_degraded_creates_nothing_and_the_operator_goes_on(cluster: Cluster) -> None:
    cluster.create("bad", {"replicas": 2, "engine": {"tensorParallelSize": 2}, "resources": {"gpusPerReplica": 1}})
    degraded = wait_for(lambda: cluster.condition("bad", "Degraded").get("reason") == "InvalidSpec"
                        and cluster.condition("bad", "Degraded"), what="Degraded/InvalidSpec")
    assert degraded["status"] == "True"
    assert ("resources.gpusPerReplica (1) must be 0 (CPU) or equal engine.tensorParallelSize x"
            " engine.pipelineParallelSize x engine.contextParallelSize (2)") in degraded["message"]
    assert any("gpusPerReplica" in m for m in cluster.events("InvalidSpec"))
    assert cluster.pods("bad") == {}

    cluster.create("good", CPU_SPEC)
    cluster.wait_ready("good", 2)


@pytest.mark.unvalidated_crd  # the API server would refuse the spec; the operator's own check is tested
def test_invalid_update_leaves_running_workers_alone(cluster: Cluster) -> None:
    cluster.create("chat", CPU_SPEC)
    cluster.wait_ready("chat", 2)
    before = {n: p.metadata.uid for n, p in cluster.pods("chat").items()}
    cluster.patch_spec("chat", {"replicas": -1})
    wait_for(lambda: cluster.condition("chat", "Degraded").get("reason") == "InvalidSpec", what="Degraded/InvalidSpec")
    assert "spec.replicas" in cluster.condition("chat", "Degraded")["message"]
    assert {n: p.metadata.uid for n, p in cluster.pods("chat").items()} == before
    cluster.patch_spec("chat", {"replicas": 1})
    wait_for(lambda: cluster.condition("chat", "Degraded").get("status") == "False", what="Degraded to clear")
