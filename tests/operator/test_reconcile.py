"""The pure reconcile function: the plan for each situation the operator meets."""

from __future__ import annotations

import datetime
import json
from typing import Any

from kvflock.operator import children, router_children
from kvflock.operator.children import Owner
from kvflock.operator.crd import InferenceServiceSpec, InferenceServiceStatus
from kvflock.operator.reconcile import (
    Action,
    Observed,
    Plan,
    Probe,
    WorkerPod,
    invalid_spec_status,
    plan_deletion,
    reconcile,
)
from kvflock.shared import names

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")
NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


def spec(**fields: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}, **fields})


def current_hash(s: InferenceServiceSpec) -> str:
    return children.spec_hash(OWNER, s)


def pod(index: int, s: InferenceServiceSpec | None = None, *, ready: bool = True, **fields: Any) -> WorkerPod:
    template_hash = fields.pop("spec_hash", current_hash(s) if s is not None else "old")
    return WorkerPod(
        name=f"chat-w-{index}", index=index, spec_hash=template_hash, phase=fields.pop("phase", "Running"),
        ready=ready, **fields,
    )


def settled_objects(s: InferenceServiceSpec) -> dict[tuple[str, str], dict[str, Any]]:
    """The Services, ConfigMap, PDBs and the ready routers exactly as the spec wants them."""
    routers = [router_children.router_pod(OWNER, s, index=i) for i in range(2)]
    for router in routers:
        router["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    manifests = [
        children.engine_configmap(OWNER, s),
        children.workers_service(OWNER),
        children.entry_service(OWNER, s),
        children.disruption_budget(OWNER),
        router_children.router_disruption_budget(OWNER),
        router_children.router_service_account(OWNER),
        router_children.router_role(OWNER),
        router_children.router_role_binding(OWNER),
        *routers,
    ]
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def run(s: InferenceServiceSpec, pods: list[WorkerPod], **observed: Any) -> Plan:
    observed.setdefault("objects", settled_objects(s))
    return reconcile(OWNER, s, Observed(pods=pods, **observed), NOW, generation=3)


def verbs(plan: Plan, kind: str = "Pod") -> list[tuple[str, str]]:
    return [(a.verb, a.name) for a in plan.actions if a.kind == kind]


def condition(plan: Plan, kind: str) -> tuple[str, str]:
    c = next(c for c in plan.status.conditions if c.type == kind)
    return c.status, c.reason


def test_create_makes_workers_services_configmap_and_budget() -> None:
    s = spec(replicas=2)
    plan = run(s, [], objects={})
    assert verbs(plan) == [("create", "chat-router-0"), ("create", "chat-router-1"), ("create", "chat-w-0"),
                           ("create", "chat-w-1")]
    kinds = sorted((a.kind, a.name) for a in plan.actions if a.kind != "Pod")
    assert kinds == [
        ("ConfigMap", "chat-engine"), ("PodDisruptionBudget", "chat"), ("PodDisruptionBudget", "chat-router"),
        ("Role", "chat-router"),
        ("RoleBinding", "chat-router"), ("Service", "chat"), ("Service", "chat-workers"),
        ("ServiceAccount", "chat-router"),
    ]
    for action in plan.actions:
        assert action.manifest is not None
        assert action.manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert action.manifest["metadata"]["labels"][names.LABEL_SERVICE] == "chat"
    assert condition(plan, "Progressing") == ("True", "ScalingUp")
    assert condition(plan, "Ready") == ("False", "ReplicasNotReady")


def test_worker_pod_runs_kvflock_serve_with_the_engine_settings() -> None:
    s = spec(replicas=1, engine={"tensorParallelSize": 2, "maxModelLen": 4096}, resources={"gpusPerReplica": 2},
             model={"source": "pvc", "claimName": "models", "path": "llama"})
    manifest = run(s, [], objects={}).actions[-1].manifest
    assert manifest is not None
    meta, container = manifest["metadata"], manifest["spec"]["containers"][0]
    assert meta["labels"] == {
        "kvflock.dev/service": "chat", "kvflock.dev/role": "worker",
        "kvflock.dev/replica": "0", "kvflock.dev/pool": "default",
    }
    assert meta["annotations"][names.ANNOTATION_SPEC_HASH] == current_hash(s)
    command = container["command"]
    assert command[:2] == ["kvflock", "serve"]
    assert command[command.index("--config") + 1] == "/etc/kvflock/engine.json"
    assert command[command.index("--port") + 1] == "8000"
    engine = json.loads(children.engine_configmap(OWNER, s)["data"]["engine.json"])
    assert engine["model"] == "/models/llama"
    assert engine["load_format"] == "auto"
    assert engine["tensor_parallel_size"] == 2
    assert engine["max_model_len"] == 4096
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # The startup probe waits for the model too: readiness is checked first once it can pass.
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["periodSeconds"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_a_pipeline_parallel_worker_asks_for_every_ranks_gpu_and_the_status_shows_the_layout() -> None:
    s = spec(replicas=1, engine={"tensorParallelSize": 2, "pipelineParallelSize": 2}, resources={})
    plan = run(s, [], objects={})
    container = plan.actions[-1].manifest["spec"]["containers"][0]
    engine = json.loads(children.engine_configmap(OWNER, s)["data"]["engine.json"])

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert (engine["tensor_parallel_size"], engine["pipeline_parallel_size"]) == (2, 2)
    assert plan.status.layout == "TP2xPP2"


def test_settled_service_needs_nothing_and_is_ready() -> None:
    s = spec(replicas=2)
    plan = run(s, [pod(0, s), pod(1, s)])
    assert plan.actions == []
    assert (plan.status.replicas, plan.status.readyReplicas, plan.status.observedGeneration) == (2, 2, 3)
    assert plan.status.selector == "kvflock.dev/service=chat,kvflock.dev/role=worker"
    assert plan.status.url == "http://chat.ml.svc.cluster.local"
    assert condition(plan, "Ready") == ("True", "AllReplicasReady")
    assert condition(plan, "Progressing") == ("False", "Stable")
    assert condition(plan, "Degraded") == ("False", "Healthy")


def test_scale_up_adds_workers_with_the_lowest_free_indexes() -> None:
    s = spec(replicas=4)
    plan = run(s, [pod(0, s), pod(2, s)])
    assert verbs(plan) == [("create", "chat-w-1"), ("create", "chat-w-3")]
    assert all(a.reason == "ScaledUp" for a in plan.actions)


def test_scale_down_drains_first_and_does_not_delete_yet() -> None:
    s = spec(replicas=1)
    plan = run(s, [pod(0, s), pod(1, s), pod(2, s)])
    assert verbs(plan) == [("drain", "chat-w-2"), ("drain", "chat-w-1")]
    assert condition(plan, "Progressing") == ("True", "ScalingDown")
    assert plan.status.replicas == 1


def test_scale_down_removes_unready_workers_at_once_then_drains_the_least_loaded() -> None:
    s = spec(replicas=1)
    probes = {"chat-w-0": Probe(NOW, running=5, waiting=0), "chat-w-1": Probe(NOW, running=0, waiting=0)}
    plan = run(s, [pod(0, s), pod(1, s), pod(2, s, ready=False)], probes=probes)
    assert verbs(plan) == [("delete", "chat-w-2"), ("drain", "chat-w-1")]


def test_draining_worker_is_deleted_once_it_reports_nothing_in_flight() -> None:
    s = spec(replicas=1)
    since = NOW - datetime.timedelta(seconds=5)
    draining = pod(1, s, draining_since=since)
    busy = run(s, [pod(0, s), draining], probes={"chat-w-1": Probe(NOW, running=2, waiting=0)})
    assert verbs(busy) == []
    assert condition(busy, "Progressing") == ("True", "Draining")
    idle = run(s, [pod(0, s), draining], probes={"chat-w-1": Probe(NOW, running=0, waiting=0)})
    assert verbs(idle) == [("delete", "chat-w-1")]


def test_draining_worker_is_deleted_when_it_reports_its_drain_finished() -> None:
    s = spec(replicas=1)
    draining = pod(1, s, ready=False, draining_since=NOW - datetime.timedelta(seconds=5))
    assert verbs(run(s, [pod(0, s), draining], probes={"chat-w-1": Probe(NOW, drained=False)})) == []
    done = run(s, [pod(0, s), draining], probes={"chat-w-1": Probe(NOW, drained=True)})
    assert verbs(done) == [("delete", "chat-w-1")]


def test_probe_from_before_the_drain_does_not_count() -> None:
    s = spec(replicas=1)
    since = NOW - datetime.timedelta(seconds=5)
    stale = {"chat-w-1": Probe(since - datetime.timedelta(seconds=1), running=0, waiting=0)}
    assert verbs(run(s, [pod(0, s), pod(1, s, draining_since=since)], probes=stale)) == []


def test_draining_worker_that_stopped_running_is_deleted() -> None:
    s = spec(replicas=1)
    stopped = pod(1, s, phase="Pending", ready=False, draining_since=NOW)
    assert verbs(run(s, [pod(0, s), stopped])) == [("delete", "chat-w-1")]


def test_draining_worker_is_deleted_after_the_drain_timeout() -> None:
    s = spec(replicas=1, drainTimeoutSeconds=30)
    early = pod(1, s, draining_since=NOW - datetime.timedelta(seconds=29))
    assert verbs(run(s, [pod(0, s), early])) == []
    late = pod(1, s, draining_since=NOW - datetime.timedelta(seconds=30))
    assert verbs(run(s, [pod(0, s), late])) == [("delete", "chat-w-1")]


def test_failed_worker_is_replaced_at_once() -> None:
    s = spec(replicas=2)
    plan = run(s, [pod(0, s), pod(1, s, ready=False, phase="Failed")])
    assert verbs(plan) == [("delete", "chat-w-1"), ("create", "chat-w-2")]
    assert [a.reason for a in plan.actions] == ["Replaced", "ScaledUp"]
    assert condition(plan, "Degraded") == ("True", "WorkerFailed")


def test_worker_deleted_by_someone_else_is_replaced_under_a_new_name() -> None:
    s = spec(replicas=2)
    plan = run(s, [pod(0, s), pod(1, s, terminating=True)])
    assert verbs(plan) == [("create", "chat-w-2")]


def test_a_worker_whose_image_cannot_be_pulled_makes_the_service_degraded() -> None:
    s = spec(replicas=1)
    stuck = pod(0, s, ready=False, stuck_reason="ImagePullBackOff", stuck_message="back-off pulling image")
    plan = run(s, [stuck])
    assert condition(plan, "Degraded") == ("True", "WorkerStuck")
    assert "chat-w-0: ImagePullBackOff: back-off pulling image" in plan.status.conditions[2].message


CRASH = {"exitCode": 1, "reason": "Error", "finishedAt": "2026-11-25T11:58:00Z",
         "message": "ValueError: tensor_parallel_size: 2 does not divide the model's num_heads=9"}


def worker_manifest(s: InferenceServiceSpec, state: dict[str, Any], *, ready: bool = False,
                    last_state: dict[str, Any] | None = None, ready_changed: str = "2026-11-25T11:57:00Z") -> dict:
    """A worker pod as the kubelet reports it: its Ready condition and its one container."""
    return {
        "metadata": {"name": "chat-w-0", "labels": {names.LABEL_REPLICA: "0"},
                     "annotations": {names.ANNOTATION_SPEC_HASH: current_hash(s)}},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": str(ready), "lastTransitionTime": ready_changed}],
            "containerStatuses": [{"restartCount": 1, "state": state, "lastState": last_state or {}}],
        },
    }


def test_degraded_stays_true_with_the_same_message_through_a_crash_loop_until_the_worker_is_ready() -> None:
    s = spec(replicas=1)
    crash_loop = [
        worker_manifest(s, {"terminated": CRASH}),  # it just died
        worker_manifest(s, {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting"}},
                        last_state={"terminated": CRASH}),
        worker_manifest(s, {"running": {"startedAt": "2026-11-25T11:58:10Z"}}, last_state={"terminated": CRASH}),
        worker_manifest(s, {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting"}},
                        last_state={"terminated": {**CRASH, "finishedAt": "2026-11-25T11:58:30Z"}}),
    ]
    conditions: list = []
    degraded = []
    for step, manifest in enumerate(crash_loop):
        observed = Observed(pods=[WorkerPod.from_manifest(manifest)], objects=settled_objects(s), conditions=conditions)
        plan = reconcile(OWNER, s, observed, NOW + datetime.timedelta(seconds=10 * step))
        conditions = plan.status.conditions
        degraded.append(next(c for c in conditions if c.type == "Degraded"))
    assert {(c.status, c.reason, c.lastTransitionTime) for c in degraded} == {("True", "WorkerCrashed", "2026-11-25T12:00:00Z")}
    assert {c.message for c in degraded} == {
        "worker chat-w-0 failed and is not ready again: Error (exit code 1): " + CRASH["message"]}

    serving = worker_manifest(s, {"running": {}}, ready=True, last_state={"terminated": CRASH},
                              ready_changed="2026-11-25T11:59:00Z")
    observed = Observed(pods=[WorkerPod.from_manifest(serving)], objects=settled_objects(s), conditions=conditions)
    assert condition(reconcile(OWNER, s, observed, NOW), "Degraded") == ("False", "Healthy")


def test_a_worker_that_went_unready_long_after_its_last_crash_is_not_reported_as_crashed() -> None:
    s = spec(replicas=1)
    manifest = worker_manifest(s, {"running": {}}, last_state={"terminated": CRASH}, ready_changed="2026-11-25T11:59:30Z")
    assert WorkerPod.from_manifest(manifest).failure is None
    assert condition(run(s, [WorkerPod.from_manifest(manifest)]), "Degraded") == ("False", "Healthy")


def test_rolling_change_surges_one_new_worker_first() -> None:
    s = spec(replicas=2)
    plan = run(s, [pod(0), pod(1)])  # both run an older spec
    assert verbs(plan) == [("create", "chat-w-2")]
    assert plan.actions[0].reason == "RollingUpdate"
    assert condition(plan, "Progressing") == ("True", "RollingUpdate")


def test_rolling_change_waits_while_the_new_worker_is_not_ready() -> None:
    s = spec(replicas=2)
    assert verbs(run(s, [pod(0), pod(1), pod(2, s, ready=False)])) == []


def test_rolling_change_retires_one_old_worker_when_the_new_one_is_ready() -> None:
    s = spec(replicas=2)
    plan = run(s, [pod(0), pod(1), pod(2, s)])
    assert verbs(plan) == [("drain", "chat-w-1")]


def test_rolling_change_adds_no_second_surge_while_an_old_worker_drains() -> None:
    s = spec(replicas=2)
    plan = run(s, [pod(0), pod(1, draining_since=NOW), pod(2, s)])
    assert verbs(plan) == []


def test_rolling_change_is_complete_when_all_workers_run_the_new_spec() -> None:
    s = spec(replicas=2)
    plan = run(s, [pod(2, s), pod(3, s)])
    assert plan.actions == []
    assert plan.status.updatedReplicas == 2


def test_changed_settings_patch_the_configmap_and_services() -> None:
    old = spec(replicas=1)
    new = spec(replicas=1, router={"port": 8080, "serviceType": "LoadBalancer"}, engine={"maxNumSeqs": 8})
    plan = run(new, [pod(0, new)], objects=settled_objects(old))
    assert sorted((a.verb, a.kind, a.name) for a in plan.actions if a.kind != "Pod") == [
        ("patch", "ConfigMap", "chat-engine"), ("patch", "Service", "chat"),
    ]


def test_url_comes_from_the_load_balancer_when_it_has_one() -> None:
    s = spec(router={"serviceType": "LoadBalancer", "port": 8080})
    objects = settled_objects(s)
    balanced = {"loadBalancer": {"ingress": [{"ip": "10.0.0.9"}]}}
    objects[("Service", "chat")] = {**objects[("Service", "chat")], "status": balanced}
    assert run(s, [pod(0, s)], objects=objects).status.url == "http://10.0.0.9:8080"


def test_url_comes_from_the_address_the_local_cluster_published_on_the_entry_service() -> None:
    s = spec(router={"serviceType": "LoadBalancer", "port": 8080})
    objects = settled_objects(s)
    entry = objects[("Service", "chat")]
    published = {**entry["metadata"], "annotations": {"kvflock.dev/endpoint": "http://127.0.0.1:30080/"}}
    objects[("Service", "chat")] = {**entry, "metadata": published,
                                    "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.9"}]}}}
    assert run(s, [pod(0, s)], objects=objects).status.url == "http://127.0.0.1:30080"


def test_deletion_deletes_every_child() -> None:
    s = spec(replicas=2)
    observed = Observed(pods=[pod(0, s), pod(1, s, terminating=True)], objects=settled_objects(s))
    actions = plan_deletion(observed)
    assert [(a.verb, a.kind, a.name) for a in actions] == [
        ("delete", "Pod", "chat-w-0"),
        ("delete", "ConfigMap", "chat-engine"),
        ("delete", "Service", "chat-workers"),
        ("delete", "Service", "chat"),
        ("delete", "PodDisruptionBudget", "chat"),
        ("delete", "PodDisruptionBudget", "chat-router"),
        ("delete", "ServiceAccount", "chat-router"),
        ("delete", "Role", "chat-router"),
        ("delete", "RoleBinding", "chat-router"),
        ("delete", "Pod", "chat-router-0"),
        ("delete", "Pod", "chat-router-1"),
    ]


def test_invalid_spec_status_is_degraded_and_keeps_the_rest() -> None:
    before = InferenceServiceStatus(replicas=2, readyReplicas=2, url="http://x")
    problem = "spec.replicas: must be >= 0"
    status = invalid_spec_status(before, problem, NOW, generation=4)
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason, degraded.message) == ("True", "InvalidSpec", problem)
    assert (status.replicas, status.readyReplicas, status.url, status.observedGeneration) == (2, 2, "http://x", 4)


def test_condition_keeps_its_transition_time_while_unchanged() -> None:
    s = spec(replicas=1)
    first = run(s, [pod(0, s)])
    observed = Observed(pods=[pod(0, s)], objects=settled_objects(s), conditions=first.status.conditions)
    later = reconcile(OWNER, s, observed, NOW + datetime.timedelta(minutes=5))
    assert [c.lastTransitionTime for c in later.status.conditions] == [
        c.lastTransitionTime for c in first.status.conditions
    ]


def test_worker_pod_reads_readiness_drain_and_stuck_state_from_its_manifest() -> None:
    manifest = {
        "metadata": {
            "name": "chat-w-4",
            "labels": {names.LABEL_REPLICA: "4"},
            "annotations": {names.ANNOTATION_SPEC_HASH: "abc", names.ANNOTATION_DRAINING: "2026-11-25T11:59:00Z"},
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff", "message": "boom"}}}],
        },
    }
    worker = WorkerPod.from_manifest(manifest)
    assert (worker.index, worker.spec_hash, worker.ready, worker.stuck_reason) == (4, "abc", True, "ImagePullBackOff")
    assert worker.draining_since == NOW - datetime.timedelta(minutes=1)


def test_every_action_names_a_reason_and_a_message() -> None:
    s = spec(replicas=1)
    actions: list[Action] = run(s, [pod(3), pod(4, phase="Failed")], objects={}).actions
    assert actions and all(a.reason and a.message for a in actions)


def router(s: InferenceServiceSpec, index: int, *, ready: bool = True, spec_hash: str | None = None,
           phase: str = "Running") -> dict[str, Any]:
    manifest = router_children.router_pod(OWNER, s, index=index)
    if spec_hash is not None:
        manifest["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH] = spec_hash
    manifest["status"] = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}
    return manifest


def with_routers(s: InferenceServiceSpec, *routers: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    objects = {k: v for k, v in settled_objects(s).items() if not (k[0] == "Pod" and "router" in k[1])}
    return {**objects, **{("Pod", r["metadata"]["name"]): r for r in routers}}


def test_two_routers_and_a_budget_keeping_one_of_them_run_in_front_of_the_workers() -> None:
    budget = router_children.router_disruption_budget(OWNER)
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": router_children.router_selector(OWNER)}}
    s = spec(replicas=1)
    assert verbs(run(s, [pod(0, s)])) == []
    plan = run(s, [pod(0, s)], objects=with_routers(s, router(s, 0, ready=False), router(s, 1)))
    assert condition(plan, "Ready") == ("True", "AllReplicasReady"), "one ready router serves the service"


def test_a_failed_router_is_replaced_at_once() -> None:
    s = spec(replicas=1)
    plan = run(s, [pod(0, s)], objects=with_routers(s, router(s, 0, phase="Failed"), router(s, 1)))
    assert verbs(plan) == [("delete", "chat-router-0"), ("create", "chat-router-2")]
    assert condition(plan, "Degraded") == ("True", "RouterFailed")


def test_a_router_spec_change_adds_a_new_router_before_removing_an_old_one() -> None:
    s = spec(replicas=1)
    old = [router(s, 0, spec_hash="old"), router(s, 1, spec_hash="old")]
    plan = run(s, [pod(0, s)], objects=with_routers(s, *old))
    assert verbs(plan) == [("create", "chat-router-2")], "surge: a new router first, nothing removed"

    starting = router(s, 2, ready=False)
    plan = run(s, [pod(0, s)], objects=with_routers(s, *old, starting))
    assert verbs(plan) == [], "the old routers stay while the new one is not ready"

    plan = run(s, [pod(0, s)], objects=with_routers(s, *old, router(s, 2)))
    assert verbs(plan) == [("delete", "chat-router-0")]

    plan = run(s, [pod(0, s)], objects=with_routers(s, old[1], router(s, 2)))
    assert verbs(plan) == [("create", "chat-router-0")]
    plan = run(s, [pod(0, s)], objects=with_routers(s, old[1], router(s, 2), router(s, 0)))
    assert verbs(plan) == [("delete", "chat-router-1")]
