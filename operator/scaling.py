"""The autoscaler at work: the load of a service's workers in, spec.replicas written out.

Each probe period (the handlers' timer) `Autoscaler.run` turns the workers' last probes and
the router's held requests into `autoscale.Sample`s, asks the pure `autoscale.decide`, and
writes a new count through the scale subresource, as `kubectl scale` and an HPA do, so that
the usual reconcile then adds or drains workers. Each change posts an Event; every decision
goes into status.autoscaler. The recommendation history lives in the operator's memory (a
restarted operator begins a new one, which holds off scaling for one window: see `autoscale`).

With length pools, only pools without a fixed `replicas` follow spec.replicas, so only their
workers' load counts.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from kvflock.operator import autoscale, workers
from kvflock.operator.children import Owner
from kvflock.operator.crd import AutoscalerStatus, InferenceServiceSpec
from kvflock.operator.kube import Cluster
from kvflock.operator.reconcile import Probe, format_time
from kvflock.shared import names


def elastic_pools(spec: InferenceServiceSpec) -> set[str]:
    """The pools whose workers follow spec.replicas."""
    if not spec.router.pools:
        return {names.DEFAULT_POOL}
    return {p.name for p in spec.router.pools if p.replicas is None}


def samples(pods: list[dict[str, Any]], pools: set[str], probes: Mapping[str, Probe],
            previous: Mapping[str, Probe]) -> list[autoscale.Sample]:
    """The load of the serving workers of `pools`: not draining, not going away."""
    found = []
    for pod in pods:
        meta = pod["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        if (labels.get(names.LABEL_POOL, names.DEFAULT_POOL) not in pools or meta.get("deletionTimestamp")
                or names.ANNOTATION_DRAINING in annotations):
            continue
        probe = probes.get(meta["name"])
        if probe is None or probe.error is not None:
            continue
        before = previous.get(meta["name"])
        ttft = autoscale.histogram_quantile(0.99, before.ttft_buckets if before else (), probe.ttft_buckets)
        found.append(autoscale.Sample(in_flight=probe.in_flight, kv_usage=probe.kv_usage, ttft_p99=ttft))
    return found


class Autoscaler:
    """Decides and writes the replicas of the services with autoscaling enabled."""

    def __init__(self, cluster: Cluster, probe_timeout: float) -> None:
        self.cluster, self.probe_timeout = cluster, probe_timeout
        self._histories: dict[tuple[str, str], autoscale.History] = {}
        self._last_scale: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._histories.pop((namespace, name), None)
            self._last_scale.pop((namespace, name), None)

    def run(self, body: Mapping[str, Any], probes: Mapping[str, Probe], previous: Mapping[str, Probe],
            now: datetime.datetime) -> None:
        meta = body["metadata"]
        namespace, name, key = meta["namespace"], meta["name"], (meta["namespace"], meta["name"])
        try:
            spec = InferenceServiceSpec.model_validate(body.get("spec") or {})
        except ValueError:
            return  # the converge pass reports the invalid spec
        pools = elastic_pools(spec)
        if not spec.autoscaling.enabled or not pools:
            self.forget(namespace, name)
            if (body.get("status") or {}).get("autoscaler"):
                self.cluster.patch_service_status(namespace, name, {"autoscaler": None})
            return
        owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
        pods, objects = self.cluster.list_children(owner)
        routers = [o for (kind, _), o in objects.items()
                   if kind == "Pod" and (o["metadata"].get("labels") or {}).get(names.LABEL_ROLE) == names.ROLE_ROUTER]
        router_urls = [url for url in map(workers.worker_url, routers) if url]
        held = sum(workers.read_held(url, self.probe_timeout) or 0 for url in router_urls)  # every router holds its own
        replicas = spec.replicas
        with self._lock:
            history = self._histories.get(key)
        decision = autoscale.decide(samples(pods, pools, probes, previous), replicas, spec.autoscaling, history,
                                    now, held, workers_per_replica=len(pools))
        with self._lock:
            self._histories[key] = decision.history
        if decision.desired != replicas:
            self.cluster.scale(namespace, name, decision.desired)
            with self._lock:
                self._last_scale[key] = format_time(now)
            kopf.info(dict(body), reason="Autoscaled",
                      message=f"Scaled from {replicas} to {decision.desired} replicas: {decision.reason}")
        with self._lock:
            last_scale = self._last_scale.get(key)
        status = AutoscalerStatus(
            desiredReplicas=decision.desired, recommendedReplicas=decision.recommended, metric=spec.autoscaling.metric,
            value=round(decision.value, 4) if decision.value is not None else None, heldRequests=held,
            reason=decision.reason, time=format_time(now), lastScaleTime=last_scale,
        )
        recorded = dict((body.get("status") or {}).get("autoscaler") or {})
        written = status.model_dump(mode="json")
        if {**recorded, "time": None} != {**written, "time": None}:  # only news, not a new time
            self.cluster.patch_service_status(namespace, name, {"autoscaler": written})
