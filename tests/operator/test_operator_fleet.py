"""The real operator under kopf against the API server: the router pod, length pools with
workers of their own, and the autoscaler writing replicas (to zero and back)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes.client
import pytest

from .conftest import wait_for
from .test_operator import GROUP, NS, PLURAL, VERSION, Cluster, cluster, operator  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(90)


def replicas(cluster: Cluster, name: str) -> int:
    return int(cluster.custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, name)["spec"]["replicas"])


def autoscaler_status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (cluster.service(name).get("status") or {}).get("autoscaler") or {}


def test_two_router_pods_run_kvflock_router_and_the_entry_service_selects_them(cluster: Cluster) -> None:
    uid = cluster.create("chat", {"replicas": 1, "resources": {"gpusPerReplica": 0}})["metadata"]["uid"]
    routers = wait_for(lambda: (found := cluster.core.list_namespaced_pod(
        NS, label_selector="kvflock.dev/service=chat,kvflock.dev/role=router").items) and len(found) == 2 and found,
        what="the router pods")
    assert sorted(p.metadata.name for p in routers) == ["chat-router-0", "chat-router-1"]
    pod = next(p for p in routers if p.metadata.name == "chat-router-0")
    assert pod.metadata.owner_references[0].uid == uid
    command = pod.spec.containers[0].command
    assert command[:2] == ["kvflock", "router"]
    assert command[command.index("--service") + 1] == "chat" and command[command.index("--namespace") + 1] == NS
    assert pod.spec.containers[0].readiness_probe.http_get.path == "/ready"
    assert pod.spec.service_account_name == "chat-router"
    entry = cluster.core.read_namespaced_service("chat", NS)
    assert entry.spec.selector == {"kvflock.dev/service": "chat", "kvflock.dev/role": "router"}
    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.core.api_client)
    role = rbac.read_namespaced_role("chat-router", NS)
    assert {(r.resources[0], tuple(r.verbs)) for r in role.rules} == {("pods", ("list", "watch")), ("configmaps", ("get",))}
    assert rbac.read_namespaced_role_binding("chat-router", NS).subjects[0].name == "chat-router"
    budget = kubernetes.client.PolicyV1Api(cluster.core.api_client).read_namespaced_pod_disruption_budget("chat-router", NS)
    assert budget.spec.min_available == 1 and budget.spec.selector.match_labels == entry.spec.selector

    cluster.wait_ready("chat", 1)  # Ready needs the router too: run_pods runs it
    cluster.core.patch_namespaced_pod_status("chat-router-0", NS, {"status": {"phase": "Failed"}})

    def replaced() -> bool:
        routers = cluster.core.list_namespaced_pod(NS, label_selector="kvflock.dev/role=router").items
        return len(routers) == 2 and pod.metadata.uid not in {p.metadata.uid for p in routers}

    wait_for(replaced, what="the failed router to be replaced")


def test_each_pool_gets_workers_with_its_own_settings(cluster: Cluster) -> None:
    pools = [
        {"name": "short", "maxPromptTokens": 256, "engine": {"maxNumSeqs": 64, "maxModelLen": 512}},
        {"name": "long", "minPromptTokens": 256, "replicas": 1, "resources": {"gpusPerReplica": 0, "memory": "16Gi"}},
    ]
    cluster.create("chat", {"replicas": 2, "resources": {"gpusPerReplica": 0}, "router": {"pools": pools}})
    cluster.wait_ready("chat", 3)
    pods = cluster.pods("chat")
    assert sorted(pods) == ["chat-long-w-0", "chat-short-w-0", "chat-short-w-1"]
    assert {p.metadata.labels["kvflock.dev/pool"] for p in pods.values()} == {"short", "long"}
    short = pods["chat-short-w-0"].spec.containers[0]
    assert short.command[short.command.index("--config") + 1] == "/etc/kvflock/engine-short.json"
    engine = json.loads(cluster.core.read_namespaced_config_map("chat-engine", NS).data["engine-short.json"])
    assert engine["max_num_seqs"] == 64 and engine["max_model_len"] == 512
    assert pods["chat-long-w-0"].spec.containers[0].resources.limits["memory"] == "16Gi"

    cluster.custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "chat", {"spec": {"replicas": 3}},
                                                        _content_type="application/merge-patch+json")
    cluster.wait_ready("chat", 4)  # the scale applies to the pool without replicas of its own
    assert sorted(cluster.pods("chat")) == ["chat-long-w-0", "chat-short-w-0", "chat-short-w-1", "chat-short-w-2"]


def test_autoscaler_writes_replicas_up_under_load_and_down_to_zero_then_wakes_for_a_held_request(
        cluster: Cluster) -> None:
    scaling = {"enabled": True, "minReplicas": 0, "maxReplicas": 3, "target": 2,
               "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 2}
    cluster.create("chat", {"replicas": 1, "resources": {"gpusPerReplica": 0}, "autoscaling": scaling,
                            "drainTimeoutSeconds": 5})
    cluster.wait_ready("chat", 1)
    cluster.workers.busy["chat-w-0"] = 5
    wait_for(lambda: replicas(cluster, "chat") == 3, what="the autoscaler to scale up to max")
    cluster.wait_ready("chat", 3)
    wait_for(lambda: autoscaler_status(cluster, "chat")["metric"] == "queueDepth", what="the decision in the status")
    assert any("Scaled from 1 to 3" in m for m in cluster.events("Autoscaled"))

    cluster.workers.busy["chat-w-0"] = 0
    wait_for(lambda: replicas(cluster, "chat") == 0, timeout=40, what="the autoscaler to scale to zero")
    wait_for(lambda: not cluster.pods("chat"), timeout=30, what="the workers to be drained and removed")
    # Each decision reaches the status in a write after the one of the replicas.
    wait_for(lambda: autoscaler_status(cluster, "chat")["desiredReplicas"] == 0, what="the decision in the status")

    cluster.workers.held["chat-router-0"] = 1
    wait_for(lambda: replicas(cluster, "chat") == 1, what="a held request to wake the service")
    wait_for(lambda: autoscaler_status(cluster, "chat")["heldRequests"] == 1, what="the held request in the status")
