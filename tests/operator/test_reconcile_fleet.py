"""The pure reconcile function for the router pods and for length pools with workers of their own."""

from __future__ import annotations

import json
from typing import Any

from kvflock.operator import children, router_children
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.operator.reconcile import Plan, WorkerPod
from kvflock.shared import names

from .test_reconcile import OWNER, condition, pod, run, settled_objects, spec, verbs

POOLS = [
    {"name": "short", "maxPromptTokens": 256, "engine": {"maxNumSeqs": 64, "maxModelLen": 512}},
    {"name": "long", "minPromptTokens": 256, "replicas": 1, "resources": {"gpusPerReplica": 0, "memory": "16Gi"}},
]


def pooled(**fields: Any) -> InferenceServiceSpec:
    return spec(router={"pools": POOLS}, **fields)


def pool_pod(s: InferenceServiceSpec, pool: str, index: int, *, ready: bool = True, **fields: Any) -> WorkerPod:
    group = children.pool_spec(s, next(p for p in s.router.pools if p.name == pool))
    return WorkerPod(name=f"chat-{pool}-w-{index}", index=index, spec_hash=children.spec_hash(OWNER, group),
                     phase="Running", ready=ready, pool=pool, **fields)


def created(plan: Plan) -> dict[str, dict[str, Any]]:
    return {a.name: dict(a.manifest) for a in plan.actions if a.verb == "create" and a.kind == "Pod" and a.manifest}


def with_routers_status(s: InferenceServiceSpec, status: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """The settled objects, with both routers in `status`."""
    objects = settled_objects(s)
    for name in ("chat-router-0", "chat-router-1"):
        objects[("Pod", name)] = {**objects[("Pod", name)], "status": status}
    return objects


def test_router_pods_run_kvflock_router_for_the_service_and_the_entry_service_selects_them() -> None:
    s = spec(replicas=1)
    routers = {name: m for name, m in created(run(s, [], objects={})).items() if "router" in name}
    assert sorted(routers) == ["chat-router-0", "chat-router-1"]
    manifest = routers["chat-router-0"]
    assert manifest["metadata"]["labels"] == {"kvflock.dev/service": "chat", "kvflock.dev/role": "router"}
    container = manifest["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["kvflock", "router"]
    assert command[command.index("--service") + 1] == "chat" and command[command.index("--namespace") + 1] == "ml"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert manifest["spec"]["serviceAccountName"] == "chat-router"
    entry = children.entry_service(OWNER, s)
    assert entry["spec"]["selector"] == router_children.router_selector(OWNER)


def test_router_role_grants_only_what_discovery_calls() -> None:
    rules = router_children.router_role(OWNER)["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
                     {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]
    binding = router_children.router_role_binding(OWNER)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-router", "namespace": "ml"}]


def test_service_is_ready_only_while_a_router_is() -> None:
    s = spec(replicas=1)
    objects = with_routers_status(s, {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]})
    assert condition(run(s, [pod(0, s)], objects=objects), "Ready") == ("False", "RouterNotReady")
    assert condition(run(s, [pod(0, s)]), "Ready") == ("True", "AllReplicasReady")
    assert condition(run(spec(replicas=0), []), "Ready") == ("True", "ScaledToZero")


def test_each_pool_gets_its_own_workers_with_its_settings() -> None:
    s = pooled(replicas=2)
    pods = created(run(s, []))
    assert sorted(pods) == ["chat-long-w-0", "chat-short-w-0", "chat-short-w-1"]
    short = pods["chat-short-w-0"]
    assert short["metadata"]["labels"][names.LABEL_POOL] == "short"
    assert short["spec"]["hostname"] == "short-w-0"
    command = short["spec"]["containers"][0]["command"]
    assert command[command.index("--config") + 1] == "/etc/kvflock/engine-short.json"
    files = children.engine_configmap(OWNER, s)["data"]
    short_engine = json.loads(files["engine-short.json"])
    assert short_engine["max_num_seqs"] == 64 and short_engine["max_model_len"] == 512
    long = pods["chat-long-w-0"]["spec"]["containers"][0]
    assert long["resources"]["limits"]["memory"] == "16Gi"
    assert long["command"][long["command"].index("--config") + 1] == "/etc/kvflock/engine-long.json"
    assert "max_model_len" not in json.loads(files["engine-long.json"])


def test_spec_replicas_scales_the_pools_without_replicas_of_their_own() -> None:
    s = pooled(replicas=3)
    existing = [pool_pod(s, "short", 0), pool_pod(s, "short", 1), pool_pod(s, "long", 0)]
    plan = run(s, existing)
    assert verbs(plan) == [("create", "chat-short-w-2")]
    assert plan.status.replicas == 3
    smaller = pooled(replicas=1)
    existing = [pool_pod(smaller, "short", 0), pool_pod(smaller, "short", 1), pool_pod(smaller, "long", 0)]
    assert verbs(run(smaller, existing)) == [("drain", "chat-short-w-1")]


def test_pools_settled_need_nothing_and_are_ready() -> None:
    s = pooled(replicas=1)
    plan = run(s, [pool_pod(s, "short", 0), pool_pod(s, "long", 0)])
    assert plan.actions == []
    assert condition(plan, "Ready") == ("True", "AllReplicasReady")
    assert plan.status.updatedReplicas == 2


def test_a_pool_change_rolls_only_that_pools_workers() -> None:
    before = pooled(replicas=1)
    pools = [POOLS[0], {**POOLS[1], "engine": {"maxNumSeqs": 4}}]
    after = spec(replicas=1, router={"pools": pools})
    plan = run(after, [pool_pod(before, "short", 0), pool_pod(before, "long", 0)])
    assert verbs(plan) == [("create", "chat-long-w-1")]


def test_workers_of_pools_no_longer_defined_go_once_the_pools_are_ready() -> None:
    s = pooled(replicas=1)
    old = pod(0, spec(replicas=1))
    plan = run(s, [old, pool_pod(s, "short", 0, ready=False), pool_pod(s, "long", 0)])
    assert verbs(plan) == [], "the old worker serves until every pool is ready"
    plan = run(s, [old, pool_pod(s, "short", 0), pool_pod(s, "long", 0)])
    assert [(a.verb, a.name, a.reason) for a in plan.actions] == [("drain", "chat-w-0", "PoolRemoved")]
