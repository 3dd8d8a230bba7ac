"""The kopf handlers: observe an InferenceService and its children, reconcile, act, report.

Handlers stay thin. Each one ends in `Runtime.converge`, which reads the service and its
children, calls the pure `reconcile`, applies the plan's actions (posting an Event for each)
and writes the status. Converging one service is serialized and coalesced: a pass asked for
while another runs makes that one run again, instead of running beside it.

Handlers are synchronous (kopf runs them in its thread pool) because the kubernetes client
and the workers' HTTP calls are.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from kvflock.operator import adapters, children, credentials, metrics, model_check, scaling, workers
from kvflock.operator.children import Owner
from kvflock.operator.crd import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    AdapterStatus,
    Condition,
    InferenceServiceSpec,
    InferenceServiceStatus,
    check_adapter_names,
    check_name,
    format_errors,
)
from kvflock.operator.kube import Cluster
from kvflock.operator.reconcile import (
    Action,
    Observed,
    Probe,
    WorkerPod,
    format_time,
    invalid_spec_status,
    plan_deletion,
    reconcile,
)
from kvflock.shared import names

log = logging.getLogger(__name__)
# Seconds a worker may take to read an adapter folder and load it (a probe's timeout is too short).
_ADAPTER_CALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class OperatorOptions:
    """Timing of the operator's own work (not of the workers: that is in each spec)."""

    probe_interval: float = 5.0  # seconds between reads of the workers' /ready and /metrics
    probe_timeout: float = 2.0  # seconds a worker may take to answer one of them
    retry_backoff: float = 3.0  # seconds before kopf retries a handler that failed
    # Whether the operator sees the files its workers see (the local cluster, whose workers are
    # processes on its machine): then a model path it cannot find is one the workers cannot find.
    shares_worker_files: bool = False
    # The kopf peering object's name for leader election between operator replicas (None: run
    # standalone), and how long a replica's keep-alive counts: a killed leader is replaced
    # after at most this long.
    peering: str | None = None
    peering_lifetime: int = 10


@dataclass
class _Pass:
    """Serializes and coalesces the converge passes of one service."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    again: bool = False
    probes: dict[str, Probe] = field(default_factory=dict)
    # The probes are fresh: the next pass syncs the workers' adapters with them.
    adapters_due: bool = False


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


class Runtime:
    """What the handlers share: the cluster client, the options, the per-service passes."""

    def __init__(self, cluster: Cluster, options: OperatorOptions) -> None:
        self.cluster = cluster
        self.options = options
        self._passes: dict[tuple[str, str], _Pass] = {}
        self._passes_lock = threading.Lock()
        self.autoscaler = scaling.Autoscaler(cluster, options.probe_timeout)

    def _pass(self, namespace: str, name: str) -> _Pass:
        with self._passes_lock:
            return self._passes.setdefault((namespace, name), _Pass())

    def forget(self, namespace: str, name: str) -> None:
        with self._passes_lock:
            self._passes.pop((namespace, name), None)
        self.autoscaler.forget(namespace, name)

    def last_probes(self, namespace: str, name: str) -> dict[str, Probe]:
        """The probes of the previous probe period."""
        return dict(self._pass(namespace, name).probes)

    def converge(self, namespace: str, name: str, probes: Mapping[str, Probe] | None = None) -> None:
        """Bring one service's children to its spec; coalesces with a pass already running."""
        state = self._pass(namespace, name)
        if probes is not None:
            state.probes = dict(probes)
            state.adapters_due = True
        state.again = True
        while state.again:
            if not state.lock.acquire(blocking=False):
                return  # the running pass sees `again` and runs once more
            try:
                state.again = False
                self._converge_once(namespace, name, state)
            finally:
                state.lock.release()

    def _converge_once(self, namespace: str, name: str, state: _Pass) -> None:
        body = self.cluster.get_service(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        meta = body["metadata"]
        owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
        generation = meta.get("generation")
        previous = _previous_status(body)
        now = _now()
        try:
            check_name(name)
            spec = InferenceServiceSpec.model_validate(body.get("spec") or {})
            check_adapter_names(name, spec)
        except (ValidationError, ValueError) as exc:
            message = format_errors(exc) if isinstance(exc, ValidationError) else str(exc)
            self._report_invalid(body, previous, message, now, generation)
            metrics.passes.labels(outcome="invalid_spec").inc()
            return
        problem = model_check.model_problem(spec, self.options.shares_worker_files)
        if problem is not None:
            self._report_invalid(body, previous, problem, now, generation, reason="InvalidModel")
            metrics.passes.labels(outcome="invalid_model").inc()
            return
        auth = self._auth_state(owner, spec) if spec.auth is not None else credentials.AuthState()
        if auth.problem is not None:
            self._report_invalid(body, previous, auth.problem, now, generation, reason="AuthSecretMissing")
            metrics.passes.labels(outcome="auth_secret_missing").inc()
            return

        pods, objects = self.cluster.list_children(owner)
        pods_by_name = {p["metadata"]["name"]: p for p in pods}
        worker_pods = [WorkerPod.from_manifest(p) for p in pods]
        adapter_status = self._sync_adapters(owner, spec, worker_pods, pods_by_name, state, previous, body)
        known = {w.name: Probe.from_status(w) for w in previous.workers}
        observed = Observed(
            pods=worker_pods,
            objects=objects,
            probes={n: p for n, p in {**known, **state.probes}.items() if p is not None and n in pods_by_name},
            conditions=previous.conditions,
            auth_hash=auth.hash,
        )
        plan = reconcile(owner, spec, observed, now, generation)
        for action in plan.actions:
            self._apply(owner, action, pods_by_name.get(action.name), body)
        # status.autoscaler is the autoscaler's to write (kvflock.operator.scaling); keep it.
        status = adapters.with_adapters(plan.status.model_copy(update={"autoscaler": previous.autoscaler}),
                                        adapter_status, previous.conditions, now, generation)
        if status.model_dump(mode="json") != previous.model_dump(mode="json"):
            self.cluster.patch_service_status(namespace, name, status.model_dump(mode="json"))
        _warn_when_degraded(body, previous, status)
        metrics.passes.labels(outcome="acted" if plan.actions else "steady").inc()

    def _sync_adapters(
        self, owner: Owner, spec: InferenceServiceSpec, pods: list[WorkerPod], pods_by_name: Mapping[str, Any],
        state: _Pass, previous: InferenceServiceStatus, body: dict[str, Any],
    ) -> list[AdapterStatus]:
        """Load and unload adapters on the workers whose adapters the last probes read (once per
        probe period: older reads could undo what a pass just did); what they serve then goes into
        `state.probes`. Returns each adapter's status, the previous one between probe periods."""
        if not state.adapters_due:
            wanted = {a.name for a in spec.adapters}
            return [a for a in previous.adapters if a.name in wanted]
        state.adapters_due = False
        held = adapters.served(pods, state.probes)
        actions = adapters.plan(spec.adapters, held)
        token = self._admin_token(owner) if actions and spec.auth is not None else None
        by_worker: dict[str, list[adapters.AdapterAction]] = {}
        for action in actions:
            by_worker.setdefault(action.worker, []).append(action)
        # Workers in parallel (a load reads the adapter's files); each worker's calls in order.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(by_worker)))) as pool:
            outcomes = [outcome for results in pool.map(
                lambda calls: [(call, _call_adapter(pods_by_name[call.worker], call, token)) for call in calls],
                by_worker.values()) for outcome in results]
        done, failures = [], {}
        for action, problem in outcomes:
            if problem is None:
                done.append(action)
                verb = "Loaded" if action.verb == "load" else "Unloaded"
                kopf.info(body, reason=f"Adapter{verb}", message=f"{verb} adapter {action.adapter!r} on worker"
                          f" {action.worker}" + (f" from {action.path}" if action.path else ""))
            elif action.verb == "load":
                failures.setdefault(action.adapter, adapters.failure_message(action, problem))
            else:  # e.g. still in use by a request: the next probe period tries again
                log.info("unloading adapter %r from worker %s failed: %s", action.adapter, action.worker, problem)
        held = adapters.after(held, done)
        for worker, has in held.items():
            state.probes[worker] = dataclasses.replace(state.probes[worker], adapters=has)
        before = {a.name: a.error for a in previous.adapters}
        for name, message in failures.items():
            if before.get(name) != message:
                kopf.warn(body, reason=adapters.REASON_LOAD_FAILED, message=message)
        return adapters.statuses(spec.adapters, held, failures)

    def _report_invalid(
        self, body: dict[str, Any], previous: InferenceServiceStatus, message: str,
        now: datetime.datetime, generation: int | None, reason: str = "InvalidSpec",
    ) -> None:
        """Degraded with the reason; children untouched; one Event per distinct problem."""
        before = next((c for c in previous.conditions if c.type == "Degraded"), None)
        status = invalid_spec_status(previous, message, now, generation, reason)
        meta = body["metadata"]
        self.cluster.patch_service_status(meta["namespace"], meta["name"], status.model_dump(mode="json"))
        if before is None or before.reason != reason or before.message != message:
            what = {"InvalidSpec": "Invalid spec", "InvalidModel": "The model cannot run"}.get(reason, "Missing API keys")
            kopf.warn(body, reason=reason, message=f"{what}, nothing changed: {message}")

    def _internal_tokens(self, owner: Owner) -> dict[str, bytes]:
        """The service's internal and admin tokens, made (once) if its internal Secret is missing."""
        name = children.internal_secret_name(owner)
        secret = self.cluster.get_secret(owner.namespace, name)
        if secret is None:
            tokens = credentials.new_tokens()
            if self.cluster.create_secret(children.internal_secret(owner, tokens)):
                return {key: value.encode() for key, value in tokens.items()}
            secret = self.cluster.get_secret(owner.namespace, name)  # another pass made it meanwhile
        return credentials.secret_data(secret or {})

    def _auth_state(self, owner: Owner, spec: InferenceServiceSpec) -> credentials.AuthState:
        """Read (never copy) the API-key Secret: the hash that rolls the pods, or what is missing."""
        assert spec.auth is not None
        ref = spec.auth.apiKeySecretRef
        internal = self._internal_tokens(owner)
        user_secret = self.cluster.get_secret(owner.namespace, ref.name)
        return credentials.auth_state(owner.namespace, ref.name, ref.key, user_secret, internal)

    def _admin_token(self, owner: Owner) -> bytes | None:
        """What /admin/* of the service's workers accepts, if auth gave them a token."""
        secret = self.cluster.get_secret(owner.namespace, children.internal_secret_name(owner))
        return credentials.admin_token(credentials.secret_data(secret)) if secret is not None else None

    def _apply(self, owner: Owner, action: Action, pod: Mapping[str, Any] | None, body: dict[str, Any]) -> None:
        cluster = self.cluster
        metrics.actions.labels(kind=action.kind, verb=action.verb).inc()
        if action.verb == "create":
            assert action.manifest is not None
            if not cluster.create(action.manifest):
                return
        elif action.verb == "patch":
            assert action.manifest is not None
            cluster.patch(action.manifest)
        elif action.verb == "delete":
            if not cluster.delete(action.kind, owner.namespace, action.name):
                return
        elif action.verb == "drain":
            url = workers.worker_url(pod) if pod is not None else None
            token = self._admin_token(owner) if url else None
            problem = workers.request_drain(url, self.options.probe_timeout, token) if url else "it has no address"
            cluster.annotate("Pod", owner.namespace, action.name, {names.ANNOTATION_DRAINING: format_time(_now())})
            if problem:
                kopf.info(body, reason=action.reason, message=f"{action.message} (drain call failed: {problem})")
                return
        kopf.info(body, reason=action.reason, message=action.message)

    def probe_workers(self, namespace: str, name: str, uid: str) -> dict[str, Probe]:
        """Read every worker's /ready and /metrics, in parallel."""
        owner = Owner(name=name, namespace=namespace, uid=uid)
        pods, _ = self.cluster.list_children(owner)
        targets = {}
        for pod in pods:
            url = workers.worker_url(pod)
            if url:
                draining = names.ANNOTATION_DRAINING in (pod["metadata"].get("annotations") or {})
                targets[pod["metadata"]["name"]] = (url, draining)
        if not targets:
            return {}
        timeout = self.options.probe_timeout
        token = self._admin_token(owner) if any(d for _, d in targets.values()) else None
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            futures = {n: pool.submit(workers.probe, u, timeout, d, token) for n, (u, d) in targets.items()}
            return {n: f.result() for n, f in futures.items()}

    def delete_children(self, namespace: str, name: str, uid: str, body: dict[str, Any]) -> None:
        owner = Owner(name=name, namespace=namespace, uid=uid)
        pods, objects = self.cluster.list_children(owner)
        observed = Observed(pods=[WorkerPod.from_manifest(p) for p in pods], objects=objects)
        for action in plan_deletion(observed):
            self._apply(owner, action, None, body)
        self.forget(namespace, name)


def _call_adapter(pod: Mapping[str, Any], action: adapters.AdapterAction, token: bytes | None) -> str | None:
    """Carry out one adapter action on its worker; why it failed, or None."""
    url = workers.worker_url(pod)
    if url is None:
        return "it has no address"
    if action.verb == "unload":
        return workers.unload_adapter(url, action.adapter, _ADAPTER_CALL_TIMEOUT, token)
    assert action.path is not None
    return workers.load_adapter(url, action.adapter, action.path, _ADAPTER_CALL_TIMEOUT, token)


def _previous_status(body: Mapping[str, Any]) -> InferenceServiceStatus:
    """The recorded status, or an empty one where it is missing or not ours to read."""
    raw = {k: v for k, v in (body.get("status") or {}).items() if k in InferenceServiceStatus.model_fields}
    try:
        return InferenceServiceStatus.model_validate(raw)
    except ValidationError:
        return InferenceServiceStatus()


def _warn_when_degraded(body: Mapping[str, Any], previous: InferenceServiceStatus,
                        status: InferenceServiceStatus) -> None:
    """One Warning Event when the service turns Degraded, or Degraded for another reason."""
    def degraded(conditions: list[Condition]) -> Condition | None:
        return next((c for c in conditions if c.type == "Degraded" and c.status == "True"), None)

    now, before = degraded(status.conditions), degraded(previous.conditions)
    if now is not None and (before is None or before.reason != now.reason):
        kopf.warn(dict(body), reason=now.reason, message=now.message)


def _owner_name(body: Mapping[str, Any]) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            return str(ref["name"])
    return None


def register(registry: kopf.OperatorRegistry, options: OperatorOptions) -> None:
    """Register the handlers; `memo.runtime` must hold a `Runtime`."""
    resource = {"group": GROUP, "version": VERSION, "plural": PLURAL}
    backoff = options.retry_backoff

    @kopf.on.resume(**resource, id="service_changed", registry=registry, backoff=backoff)
    @kopf.on.create(**resource, id="service_changed", registry=registry, backoff=backoff)
    @kopf.on.update(**resource, id="service_changed", registry=registry, backoff=backoff)
    def service_changed(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
        """A service appeared or its spec, labels or annotations changed."""
        memo.runtime.converge(namespace, name)

    @kopf.on.delete(**resource, id="service_deleted", registry=registry, backoff=backoff)
    def service_deleted(name: str, namespace: str, uid: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        """The service is being deleted: delete its children, then let it go (the finalizer)."""
        memo.runtime.delete_children(namespace, name, uid, dict(body))

    @kopf.timer(**resource, id="workers_probed", registry=registry, interval=options.probe_interval,
                backoff=backoff)
    def workers_probed(name: str, namespace: str, uid: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        """Periodically: read the workers into status, autoscale, finish drains, retry whatever failed."""
        runtime: Runtime = memo.runtime
        probes = runtime.probe_workers(namespace, name, uid)
        previous = runtime.last_probes(namespace, name)
        runtime.converge(namespace, name, probes)
        runtime.autoscaler.run(dict(body), probes, previous, _now())

    @kopf.index(**resource, id="services_by_secret", registry=registry)
    def services_by_secret(name: str, namespace: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str] | None:
        """The services that mount each API-key Secret, by (namespace, Secret name)."""
        secret = ((spec.get("auth") or {}).get("apiKeySecretRef") or {}).get("name")
        return {(namespace, secret): name} if secret else None

    @kopf.on.event("", "v1", "secrets", id="secret_changed", registry=registry)
    def secret_changed(name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
                       services_by_secret: kopf.Index[tuple[str, str], str], **_: Any) -> None:
        """An API-key Secret (or a service's internal one) appeared, changed or went away:
        converge the services that mount it, which roll their pods when its content changed."""
        services = set(services_by_secret.get((namespace, name), ()))
        owner = _owner_name(body)
        if owner is not None:
            services.add(owner)
        for service in sorted(services):
            memo.runtime.converge(namespace, service)

    @kopf.on.event("", "v1", "pods", id="worker_changed", labels={names.LABEL_ROLE: names.ROLE_WORKER}, registry=registry)
    def worker_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
        """A worker pod changed or went away: converge its service at once."""
        owner = _owner_name(body)
        if owner is not None:
            memo.runtime.converge(namespace, owner)

    @kopf.on.event("", "v1", "pods", id="router_changed", labels={names.LABEL_ROLE: names.ROLE_ROUTER}, registry=registry)
    def router_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
        """The router pod changed or went away: converge its service at once."""
        owner = _owner_name(body)
        if owner is not None:
            memo.runtime.converge(namespace, owner)
