"""The reconcile function: an InferenceService's spec and its observed children in, a plan out.

`reconcile` is pure (no I/O, the time is an argument): it computes the desired children,
diffs them against what exists, and returns the actions that close the gap together with
the status to record. Its rules, in the order they apply:

- A failed worker (phase Failed or Succeeded) is deleted and a new one created at once.
- Degraded is True while a worker is stuck (its image cannot be pulled, ...) or while one whose
  container failed (a crash, a failed probe) has not turned Ready since: through a crash loop's
  back-offs and restarts alike, with the failure's own message, until the worker serves again.
- Missing workers are created, each named <name>-w-<n> with the lowest free n.
- With `router.pools`, each pool is its own group of workers (<name>-<pool>-w-<n>, label
  kvflock.dev/pool=<pool>) with the pool's replicas, resources and engine settings, and every
  rule here applies to each pool on its own. A pool without `replicas` has spec.replicas
  workers (what kubectl scale and the autoscaler write). Workers of a pool no longer defined
  are drained once every defined pool has all its workers ready.
- Surplus workers go in the order of kvflock.operator.scale_in: not-ready, then least work in
  flight, then least cache, then highest n. A ready
  one is drained first (POST /admin/drain) and deleted once drained: the worker reported
  nothing in flight, or it stopped running, or `drainTimeoutSeconds` passed. A not-ready
  one serves nothing and is deleted at once.
- A spec change rolls the workers one at a time: one worker of the new spec is added
  (surge one), and once it is ready one worker of an older spec is drained and removed.
- Services, the engine ConfigMap and the PodDisruptionBudget are created or patched
  until they contain what the spec asks.
- Two router pods (and their ServiceAccount, Role, RoleBinding and PodDisruptionBudget) are
  created; a failed one is deleted and created afresh; on a spec change a router of the new spec
  is added first and an older one deleted only once the new ones are ready. The service is
  Ready only while a router is.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvflock.operator import children, inference_pool, router_children, scale_in
from kvflock.operator.children import Owner
from kvflock.operator.crd import Condition, InferenceServiceSpec, InferenceServiceStatus, WorkerStatus
from kvflock.shared import names

# Container waiting reasons that mean a worker will not come up without help. A crash loop is
# not among them: a crashed worker is reported from its last termination (`WorkerPod.failure`),
# the same during the back-off and the restart after it.
_STUCK_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName"})
# Pod conditions carry whole seconds, and a container's death turns its pod unready within about
# a second; a Ready transition later than this after the last failure means it was Ready since.
_READY_AFTER_FAILURE = datetime.timedelta(seconds=2)


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WorkerPod:
    """What reconcile needs to know of one observed worker Pod."""

    name: str
    index: int
    spec_hash: str | None = None
    phase: str = "Pending"
    ready: bool = False
    terminating: bool = False
    draining_since: datetime.datetime | None = None
    stuck_reason: str | None = None
    stuck_message: str = ""
    pool: str = names.DEFAULT_POOL
    failure: str | None = None  # its container's last failure, while it has not been Ready since

    @classmethod
    def from_manifest(cls, pod: Mapping[str, Any]) -> WorkerPod:
        meta = pod.get("metadata", {})
        status = pod.get("status") or {}
        annotations = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        index_text = labels.get(names.LABEL_REPLICA) or meta["name"].rsplit("-", 1)[-1]
        ready_condition = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        ready = ready_condition.get("status") == "True"
        stuck = next(
            (
                cs["state"]["waiting"]
                for cs in status.get("containerStatuses") or []
                if (cs.get("state") or {}).get("waiting", {}).get("reason") in _STUCK_REASONS
            ),
            None,
        )
        return cls(
            name=meta["name"],
            index=int(index_text) if index_text.isdigit() else -1,
            spec_hash=annotations.get(names.ANNOTATION_SPEC_HASH),
            phase=status.get("phase") or "Pending",
            ready=ready,
            terminating=bool(meta.get("deletionTimestamp")),
            draining_since=_parse_time(annotations.get(names.ANNOTATION_DRAINING)),
            stuck_reason=stuck["reason"] if stuck else None,
            stuck_message=(stuck or {}).get("message", ""),
            pool=labels.get(names.LABEL_POOL) or names.DEFAULT_POOL,
            failure=None if ready else _last_failure(status, _parse_time(ready_condition.get("lastTransitionTime"))),
        )

    @property
    def failed(self) -> bool:
        return self.phase in ("Failed", "Succeeded")


def _last_failure(status: Mapping[str, Any], unready_since: datetime.datetime | None) -> str | None:
    """The container's last failed run (exit code, reason, and its own last words: the
    termination message, which `FallbackToLogsOnError` fills from its log), or None when it
    has none or turned Ready after it. It stays the same through a crash loop's back-off and
    restarts, so the condition it feeds does not flap."""
    for container in status.get("containerStatuses") or []:
        terminated = ((container.get("state") or {}).get("terminated")
                      or (container.get("lastState") or {}).get("terminated"))
        if not terminated or terminated.get("exitCode") == 0:
            continue
        finished = _parse_time(terminated.get("finishedAt"))
        if finished is not None and unready_since is not None and unready_since - finished >= _READY_AFTER_FAILURE:
            continue  # it was Ready after this failure and went unready for another reason
        text = f"{terminated.get('reason') or 'Error'} (exit code {terminated.get('exitCode')})"
        message = " ".join(str(terminated.get("message") or "").split())
        return f"{text}: {message}" if message else text
    return None


@dataclass(frozen=True)
class Probe:
    """One read of a worker's /ready and /metrics."""

    at: datetime.datetime
    ready: bool | None = None
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None
    cached_blocks: int | None = None  # KV blocks holding a known prefix
    drained: bool | None = None  # from GET /admin/drain, read only while the worker drains
    error: str | None = None
    ttft_buckets: tuple[tuple[float, float], ...] = ()  # the TTFT histogram (for the autoscaler)
    adapters: Mapping[str, str] | None = None  # LoRA adapter -> its folder, from /metrics (None: not read)

    @property
    def in_flight(self) -> int | None:
        if self.running is None or self.waiting is None:
            return None
        return self.running + self.waiting

    @classmethod
    def from_status(cls, worker: WorkerStatus) -> Probe | None:
        at = _parse_time(worker.probeTime)
        if at is None:
            return None
        return cls(
            at=at, running=worker.runningRequests, waiting=worker.waitingRequests, kv_usage=worker.kvCacheUsage,
            cached_blocks=worker.cachedBlocks,
            drained=worker.drained, error=worker.probeError,
            adapters=worker.adapters,
        )


@dataclass(frozen=True)
class Observed:
    """Everything reconcile looks at besides the spec."""

    pods: Sequence[WorkerPod] = ()
    # Other children by (kind, name): Services, the ConfigMap, the PodDisruptionBudget.
    objects: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    probes: Mapping[str, Probe] = field(default_factory=dict)
    conditions: Sequence[Condition] = ()
    auth_hash: str | None = None  # of the Secrets the pods mount (kvflock.operator.credentials)


@dataclass(frozen=True)
class Action:
    """One step of a plan. `verb` is create, patch, drain or delete; `manifest` the object."""

    verb: str
    kind: str
    name: str
    reason: str
    message: str
    manifest: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    status: InferenceServiceStatus


def _contains(actual: Any, desired: Any) -> bool:
    """Whether an observed value already has everything a desired one asks for."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(_contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(_contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return actual == desired


def _sync_object(desired: dict[str, Any], observed: Mapping[str, Any] | None) -> Action | None:
    kind, name = desired["kind"], desired["metadata"]["name"]
    if observed is None:
        return Action("create", kind, name, "Created", f"Created {kind} {name}", desired)
    content = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata")}
    wanted = {**content, "metadata": {"labels": desired["metadata"]["labels"]}}
    if not _contains(observed, wanted):
        return Action("patch", kind, name, "Updated", f"Updated {kind} {name} to match the spec", desired)
    return None


def _drained(pod: WorkerPod, probe: Probe | None, now: datetime.datetime, timeout: int) -> str | None:
    """Why a draining worker may go now, or None while it still finishes requests.

    Readiness says nothing here: a draining worker turns itself not-ready on purpose.
    """
    assert pod.draining_since is not None
    if pod.phase != "Running":
        return "it is not running"
    # The annotation keeps whole seconds, so only a probe a second past it surely came after
    # the drain began; an earlier one may predate requests that are still running.
    surely_after = pod.draining_since + datetime.timedelta(seconds=1)
    if probe is not None and probe.at >= surely_after and (probe.drained or probe.in_flight == 0):
        return "it has no requests left"
    if now - pod.draining_since >= datetime.timedelta(seconds=timeout):
        return f"its drain timeout of {timeout}s passed"
    return None


def _candidate(pod: WorkerPod, probes: Mapping[str, Probe]) -> scale_in.Candidate:
    probe = probes.get(pod.name)
    if probe is None:
        return scale_in.Candidate(pod.name, pod.index, pod.ready)
    return scale_in.Candidate(pod.name, pod.index, pod.ready, probe.in_flight, probe.cached_blocks)


def _condition(
    kind: str, status: bool, reason: str, message: str, previous: Sequence[Condition], now: datetime.datetime,
    generation: int | None,
) -> Condition:
    text = "True" if status else "False"
    before = next((c for c in previous if c.type == kind), None)
    since = before.lastTransitionTime if before is not None and before.status == text else format_time(now)
    return Condition(
        type=kind, status=text, reason=reason, message=message, lastTransitionTime=since,
        observedGeneration=generation,
    )


def _sync_objects(owner: Owner, spec: InferenceServiceSpec, observed: Observed) -> list[Action]:
    """Create or patch the Services, the engine ConfigMap, the PodDisruptionBudgets, the router's
    identity and the InferencePool's children; delete the latter once spec.inferencePool is gone."""
    desired = (
        children.engine_configmap(owner, spec),
        children.workers_service(owner),
        children.entry_service(owner, spec),
        children.disruption_budget(owner),
        router_children.router_disruption_budget(owner),
        router_children.router_service_account(owner),
        router_children.router_role(owner),
        router_children.router_role_binding(owner),
        *inference_pool.children(owner, spec),
    )
    actions = (_sync_object(d, observed.objects.get((d["kind"], d["metadata"]["name"]))) for d in desired)
    removed = [Action("delete", kind, name, "Deleted", f"Deleted {kind} {name}: spec.inferencePool was removed")
               for kind, name in inference_pool.leftovers(owner, spec, observed.objects)]
    return [a for a in actions if a is not None] + removed


def _router_index(owner: Owner, name: str) -> int | None:
    prefix = router_children.router_pod_name(owner, 0)[:-1]
    suffix = name[len(prefix):] if name.startswith(prefix) else ""
    return int(suffix) if suffix.isdigit() else None


def _sync_router(owner: Owner, spec: InferenceServiceSpec, observed: Observed) -> tuple[list[Action], bool, str | None]:
    """The router pods' actions, whether one of them is ready, and what is wrong, if anything.

    Routers hold no state worth draining, so a failed one is deleted and replaced at once. A
    spec change surges: a router of the new spec is added, and an older one is deleted only
    once every new one is ready, so the entry Service always has a ready router.
    """
    wanted_hash = router_children.router_pod(owner, spec, observed.auth_hash)["metadata"]["annotations"][
        names.ANNOTATION_SPEC_HASH]
    routers: dict[int, Mapping[str, Any]] = {}
    for (kind, name), manifest in observed.objects.items():
        index = _router_index(owner, name) if kind == "Pod" else None
        if index is not None:
            routers[index] = manifest
    actions: list[Action] = []
    problems: list[str] = []
    current: list[tuple[int, bool]] = []  # (index, ready) of the live routers of this spec
    old: list[tuple[int, bool]] = []
    for index, manifest in sorted(routers.items()):
        meta, status = manifest.get("metadata") or {}, manifest.get("status") or {}
        name = meta["name"]
        if meta.get("deletionTimestamp"):
            continue
        phase = status.get("phase") or "Pending"
        if phase in ("Failed", "Succeeded"):
            actions.append(Action("delete", "Pod", name, "Replaced", f"Router {name} {phase.lower()}; replacing it"))
            problems.append(f"router {name} {phase.lower()} and was replaced")
            continue
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        same = (meta.get("annotations") or {}).get(names.ANNOTATION_SPEC_HASH) == wanted_hash
        (current if same else old).append((index, ready))
    wanted = router_children.ROUTER_REPLICAS
    live = len(current) + len(old)
    # One router beyond the wanted number while older ones are being replaced (the surge).
    room = wanted + (1 if old else 0) - live
    taken = set(routers)
    for _ in range(max(0, min(wanted - len(current), room))):
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        taken.add(index)
        manifest = router_children.router_pod(owner, spec, observed.auth_hash, index)
        name = manifest["metadata"]["name"]
        actions.append(Action("create", "Pod", name, "Created", f"Created router {name}", manifest))
    if old and current and all(ready for _, ready in current) and live > wanted:
        # The new routers serve: retire the older ones beyond the wanted number, unready ones first.
        for index, _ in sorted(old, key=lambda r: r[1])[: live - wanted]:
            name = router_children.router_pod_name(owner, index)
            actions.append(Action("delete", "Pod", name, "RouterUpdated", f"Replaced router {name}: its spec changed"))
    elif not old and len(current) > wanted:
        for index, _ in sorted(current, key=lambda r: (r[1], -r[0]))[: len(current) - wanted]:
            name = router_children.router_pod_name(owner, index)
            actions.append(Action("delete", "Pod", name, "Removed", f"Removed surplus router {name}"))
    ready = any(r for _, r in current + old)
    return actions, ready, "; ".join(problems) or None


@dataclass(frozen=True)
class _Group:
    """The workers of one pool: what they run and how many of them."""

    pool: str
    spec: InferenceServiceSpec
    hash: str


def _groups(owner: Owner, spec: InferenceServiceSpec, auth_hash: str | None) -> list[_Group]:
    """One group per pool of `router.pools`, or the one default pool when none is defined."""
    if not spec.router.pools:
        return [_Group(names.DEFAULT_POOL, spec, children.spec_hash(owner, spec, auth_hash))]
    groups = []
    for pool in spec.router.pools:
        pool_spec = children.pool_spec(spec, pool)
        groups.append(_Group(pool.name, pool_spec, children.spec_hash(owner, pool_spec, auth_hash)))
    return groups


class _WorkerPlan:
    """The worker actions of one reconcile pass, with what they mean for the conditions."""

    def __init__(self, owner: Owner, spec: InferenceServiceSpec, observed: Observed, groups: list[_Group]) -> None:
        self.owner, self.spec, self.observed, self.groups = owner, spec, observed, groups
        self.pods = sorted(observed.pods, key=lambda p: (p.pool, p.index))
        self.actions: list[Action] = []
        self.degraded: list[tuple[str, str]] = []
        self.progress: tuple[str, str] | None = None
        self._taken: dict[str, set[int]] = {}
        for pod in self.pods:
            self._taken.setdefault(pod.pool, set()).add(pod.index)

    def create(self, group: _Group, reason: str, message: str) -> None:
        taken = self._taken.setdefault(group.pool, set())
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        taken.add(index)
        manifest = children.worker_pod(self.owner, group.spec, index, group.hash, self.observed.auth_hash, group.pool)
        name = manifest["metadata"]["name"]
        self.actions.append(Action("create", "Pod", name, reason, message.format(name=name), manifest))

    def remove(self, pod: WorkerPod, reason: str, message: str) -> None:
        """Drain a ready worker; delete a not-ready one (it serves nothing) at once."""
        if pod.ready:
            self.actions.append(Action("drain", "Pod", pod.name, reason, f"Draining {message}"))
        else:
            self.actions.append(Action("delete", "Pod", pod.name, reason, f"Removed {message} (not ready)"))

    def removal_order(self, group: list[WorkerPod]) -> list[WorkerPod]:
        by_name = {p.name: p for p in group}
        return [by_name[name] for name in scale_in.removal_order([_candidate(p, self.observed.probes) for p in group])]

    def settle_leaving(self, now: datetime.datetime) -> list[WorkerPod]:
        """Replace failed workers, delete drained ones; the rest are the active workers."""
        active = []
        for pod in self.pods:
            if pod.terminating:
                continue
            if pod.failed:
                phase = pod.phase.lower()
                message = f"Worker {pod.name} {phase}; replacing it"
                self.actions.append(Action("delete", "Pod", pod.name, "Replaced", message))
                self.degraded.append(("WorkerFailed", f"worker {pod.name} {phase} and was replaced"))
            elif pod.draining_since is not None:
                why = _drained(pod, self.observed.probes.get(pod.name), now, self.spec.drainTimeoutSeconds)
                if why is not None:
                    message = f"Removed drained worker {pod.name}: {why}"
                    self.actions.append(Action("delete", "Pod", pod.name, "Removed", message))
            else:
                active.append(pod)
                if pod.stuck_reason:
                    text = f"worker {pod.name}: {pod.stuck_reason}: {pod.stuck_message}".rstrip(": ")
                    self.degraded.append(("WorkerStuck", text))
                elif pod.failure:
                    self.degraded.append(("WorkerCrashed", f"worker {pod.name} failed and is not ready again: {pod.failure}"))
        return active

    def scale_and_roll(self, active: list[WorkerPod]) -> None:
        """Bring each pool to its replicas; then retire the workers of pools no longer defined."""
        for group in self.groups:
            progress = self._scale_group(group, [p for p in active if p.pool == group.pool])
            self.progress = self.progress or progress
        pools = {g.pool for g in self.groups}
        orphans = [p for p in active if p.pool not in pools]
        if not orphans:
            return
        # They keep serving until every pool has all its workers ready.
        settled = self.progress is None and all(p.ready for p in active if p.pool in pools)
        if settled:
            for pod in orphans:
                self.remove(pod, "PoolRemoved", f"worker {pod.name} of pool {pod.pool}, no longer defined")
        self.progress = self.progress or ("PoolRemoved", f"retiring {len(orphans)} worker(s) of undefined pools")

    def _scale_group(self, group: _Group, active: list[WorkerPod]) -> tuple[str, str] | None:
        """Create or remove one pool's workers toward its replicas, rolling older specs one at a time."""
        where = "" if group.pool == names.DEFAULT_POOL else f" in pool {group.pool}"
        new = [p for p in active if p.spec_hash == group.hash]
        old = [p for p in active if p.spec_hash != group.hash]
        draining = any(p.draining_since is not None and not p.terminating for p in self.pods if p.pool == group.pool)
        wanted, total = group.spec.replicas, len(active)
        if total < wanted:
            for _ in range(wanted - total):
                self.create(group, "ScaledUp", "Created worker {name}" + f" ({total} of {wanted} replicas existed{where})")
            return ("ScalingUp", f"creating {wanted - total} worker(s) to reach {wanted} replicas{where}")
        if old:
            new_ready = all(p.ready for p in new)
            allowed = wanted if new_ready else wanted + 1  # the surge worker stays while it comes up
            if total > allowed:
                for pod in self.removal_order(old)[: total - allowed]:
                    self.remove(pod, "RollingUpdate", f"worker {pod.name} of an older spec")
            elif new_ready and not draining:
                self.create(group, "RollingUpdate", "Created worker {name} of the new spec" + f" ({len(old)} older left)")
            return ("RollingUpdate", f"{len(new)} of {wanted} workers{where} run spec {group.hash}; {len(old)} older left")
        if total > wanted:
            for pod in self.removal_order(new)[: total - wanted]:
                self.remove(pod, "ScaledDown", f"worker {pod.name} to scale down to {wanted} replicas{where}")
            return ("ScalingDown", f"removing {total - wanted} worker(s) to reach {wanted} replicas{where}")
        if draining:
            return ("Draining", "waiting for drained workers to finish their requests")
        return None


def reconcile(
    owner: Owner,
    spec: InferenceServiceSpec,
    observed: Observed,
    now: datetime.datetime,
    generation: int | None = None,
) -> Plan:
    """The actions that turn the observed children into the desired ones, and the new status."""
    groups = _groups(owner, spec, observed.auth_hash)
    hashes = {g.pool: g.hash for g in groups}
    # One hash for the whole service: the single pool's, or one over every pool's.
    current_hash = groups[0].hash if len(groups) == 1 else hashlib.sha256(
        ",".join(f"{g.pool}={g.hash}" for g in groups).encode()).hexdigest()[:12]
    workers = _WorkerPlan(owner, spec, observed, groups)
    active = workers.settle_leaving(now)
    workers.scale_and_roll(active)

    leaving = {a.name for a in workers.actions if a.verb in ("drain", "delete")}
    staying = [p for p in active if p.name not in leaving]
    ready = sum(p.ready for p in staying)
    wanted = sum(g.spec.replicas for g in groups)
    progress = workers.progress
    if progress is None and ready < len(staying):
        progress = ("WaitingForReady", f"{ready} of {len(staying)} workers ready")
    router_actions, router_ready, router_problem = _sync_router(owner, spec, observed)
    degraded = workers.degraded + ([("RouterFailed", router_problem)] if router_problem else [])

    def condition(kind: str, status: bool, reason: str, message: str) -> Condition:
        return _condition(kind, status, reason, message, observed.conditions, now, generation)

    conditions = [
        condition(
            "Ready", ready >= wanted and router_ready,
            "ReplicasNotReady" if ready < wanted else "RouterNotReady" if not router_ready
            else "ScaledToZero" if wanted == 0 else "AllReplicasReady",
            f"{ready} of {wanted} replicas ready" + ("" if router_ready else "; the router is not ready"),
        ),
        condition(
            "Progressing", progress is not None, progress[0] if progress else "Stable",
            progress[1] if progress else f"{wanted} replicas run spec {current_hash}",
        ),
        condition(
            "Degraded", bool(degraded), degraded[0][0] if degraded else "Healthy",
            "; ".join(m for _, m in degraded) if degraded else "no failed or stuck workers",
        ),
    ]
    status = InferenceServiceStatus(
        replicas=len(staying),
        readyReplicas=ready,
        updatedReplicas=sum(p.spec_hash == hashes.get(p.pool) for p in staying),
        selector=children.selector_string(owner),
        url=children.service_url(owner, spec, observed.objects.get(("Service", owner.name))),
        model=children.served_model_name(owner, spec),
        layout=spec.engine.layout.label,
        specHash=current_hash,
        observedGeneration=generation,
        workers=[
            _worker_status(p, observed.probes.get(p.name), hashes.get(p.pool)) for p in workers.pods if not p.terminating
        ],
        conditions=conditions,
    )
    return Plan(_sync_objects(owner, spec, observed) + router_actions + workers.actions, status)


def _worker_status(pod: WorkerPod, probe: Probe | None, current_hash: str | None) -> WorkerStatus:
    return WorkerStatus(
        name=pod.name,
        phase=pod.phase,
        ready=pod.ready,
        updated=pod.spec_hash == current_hash,
        draining=pod.draining_since is not None,
        drained=probe.drained if probe else None,
        runningRequests=probe.running if probe else None,
        waitingRequests=probe.waiting if probe else None,
        kvCacheUsage=probe.kv_usage if probe else None,
        cachedBlocks=probe.cached_blocks if probe else None,
        probeTime=format_time(probe.at) if probe else None,
        probeError=probe.error if probe else None,
        adapters=dict(sorted(probe.adapters.items())) if probe and probe.adapters is not None else None,
    )


def plan_deletion(observed: Observed) -> list[Action]:
    """Delete every child: the InferenceService is going away."""
    actions = [
        Action("delete", "Pod", pod.name, "Deleted", f"Deleted worker {pod.name}: the service is being deleted")
        for pod in observed.pods
        if not pod.terminating
    ]
    actions += [
        Action("delete", kind, name, "Deleted", f"Deleted {kind} {name}: the service is being deleted")
        for kind, name in observed.objects
    ]
    return actions


def invalid_spec_status(
    previous: InferenceServiceStatus, message: str, now: datetime.datetime, generation: int | None,
    reason: str = "InvalidSpec",
) -> InferenceServiceStatus:
    """The status of a service whose spec the operator cannot act on (an invalid spec, or a
    Secret it names that is missing): Degraded with `reason`, nothing else changed."""
    conditions = [c for c in previous.conditions if c.type != "Degraded"]
    conditions.append(_condition("Degraded", True, reason, message, previous.conditions, now, generation))
    return previous.model_copy(update={"conditions": conditions, "observedGeneration": generation})
