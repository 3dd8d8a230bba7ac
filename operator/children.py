"""Manifests of an InferenceService's children: worker Pods, Services, ConfigMap, PodDisruptionBudget.

Plain functions from the validated spec to Kubernetes objects as dicts; no I/O. The workers'
spec hash covers the pod template and the engine settings, so any change to either rolls the
workers (see `reconcile`); the template names the API keys' Secret and key, so pointing
`spec.auth` elsewhere rolls them too (a new value written into the same Secret key does not).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

from kvfleet.operator.crd import API_VERSION, KIND, InferenceServiceSpec

LABEL_SERVICE = "kvfleet.dev/service"
LABEL_ROLE = "kvfleet.dev/role"
LABEL_REPLICA = "kvfleet.dev/replica"
LABEL_POOL = "kvfleet.dev/pool"
ANNOTATION_SPEC_HASH = "kvfleet.dev/spec-hash"
ANNOTATION_DRAINING = "kvfleet.dev/draining-since"
# A worker Pod's or the entry Service's address where it has no IP of its own: the local
# cluster (kvfleet.kubelet, kvfleet.loadbalancer) writes it, and it wins over the IP.
ANNOTATION_ENDPOINT = "kvfleet.dev/endpoint"

WORKER_PORT = 8000
DEFAULT_POOL = "default"
ENGINE_CONFIG_DIR = "/etc/kvfleet"
MODELS_DIR = "/models"
# The API keys' Secret is mounted beside, not inside, ENGINE_CONFIG_DIR: a mount point nested in
# a (read-only) ConfigMap volume cannot be created by the container runtime.
AUTH_DIR = "/etc/kvfleet-auth"
API_KEY_FILE = "api-keys"


@dataclass(frozen=True)
class Owner:
    """The InferenceService that owns the children."""

    name: str
    namespace: str
    uid: str

    @property
    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def worker_selector(owner: Owner) -> dict[str, str]:
    return {LABEL_SERVICE: owner.name, LABEL_ROLE: "worker"}


def selector_string(owner: Owner) -> str:
    return ",".join(f"{k}={v}" for k, v in worker_selector(owner).items())


def worker_name(owner: Owner, index: int) -> str:
    return f"{owner.name}-w-{index}"


def workers_service_name(owner: Owner) -> str:
    return f"{owner.name}-workers"


def engine_configmap_name(owner: Owner) -> str:
    return f"{owner.name}-engine"


def served_model_name(owner: Owner, spec: InferenceServiceSpec) -> str:
    return spec.model.servedName or owner.name


def _metadata(owner: Owner, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {LABEL_SERVICE: owner.name, **labels},
        "ownerReferences": [owner.reference],
    }


def _model_argument(spec: InferenceServiceSpec) -> str:
    model = spec.model
    if model.source == "demo":
        return "demo"
    if model.source == "path":
        return str(model.path)
    return posixpath.normpath(posixpath.join(MODELS_DIR, model.path or "."))


def _serve_args(owner: Owner, spec: InferenceServiceSpec) -> list[str]:
    engine = spec.engine
    args = [
        "kvfleet", "serve",
        "--model", _model_argument(spec),
        "--served-model-name", served_model_name(owner, spec),
        "--host", "0.0.0.0",
        "--port", str(WORKER_PORT),
        "--load-format", spec.model.format,
        "--tensor-parallel-size", str(engine.tensorParallelSize),
        "--dtype", engine.dtype,
        "--max-num-seqs", str(engine.maxNumSeqs),
        "--max-num-batched-tokens", str(engine.maxNumBatchedTokens),
        "--block-size", str(engine.kvCache.blockSize),
    ]
    if engine.maxModelLen is not None:
        args += ["--max-model-len", str(engine.maxModelLen)]
    if spec.auth is not None:  # a path, never the keys: they stay in the Secret
        args += ["--api-key-file", f"{AUTH_DIR}/{API_KEY_FILE}"]
    return args


def _volumes(owner: Owner, spec: InferenceServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the worker container's mounts of them."""
    volumes: list[dict[str, Any]] = [
        {"name": "engine-config", "configMap": {"name": engine_configmap_name(owner)}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "engine-config", "mountPath": ENGINE_CONFIG_DIR, "readOnly": True}]
    model = spec.model
    if model.source == "pvc":
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": model.claimName, "readOnly": True}})
    elif model.source == "hostPath":
        volumes.append({"name": "models", "hostPath": {"path": model.hostPath, "type": "Directory"}})
    if model.source in ("pvc", "hostPath"):
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    kv = spec.engine.kvCache
    if kv.diskOffloadGiB > 0:
        volumes.append({"name": "kv-disk", "emptyDir": {"sizeLimit": f"{int(kv.diskOffloadGiB * 1024)}Mi"}})
        mounts.append({"name": "kv-disk", "mountPath": kv.diskPath})
    if spec.engine.tensorParallelSize > 1:  # ranks exchange tensors through shared memory
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.auth is not None:
        ref = spec.auth.apiKeySecretRef
        volumes.append(
            {"name": "api-keys", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": API_KEY_FILE}]}}
        )
        mounts.append({"name": "api-keys", "mountPath": AUTH_DIR, "readOnly": True})
    return volumes, mounts


def _resources(spec: InferenceServiceSpec) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    limits: dict[str, Any] = {"memory": spec.resources.memory}
    if spec.gpus:
        requests[spec.resources.gpuResourceName] = spec.gpus
        limits[spec.resources.gpuResourceName] = spec.gpus
    return {"requests": requests, "limits": limits}


def _probes(spec: InferenceServiceSpec) -> dict[str, Any]:
    timing = spec.probes
    common = {"periodSeconds": timing.periodSeconds, "timeoutSeconds": timing.timeoutSeconds}
    return {
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "failureThreshold": timing.failureThreshold,
            **common,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "failureThreshold": max(1, timing.startupSeconds // timing.periodSeconds),
            **common,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "failureThreshold": timing.failureThreshold,
            **common,
        },
    }


def worker_template(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The pod spec shared by all workers of the current spec."""
    volumes, mounts = _volumes(owner, spec)
    env = [
        {"name": "KVFLEET_ENGINE_CONFIG", "value": f"{ENGINE_CONFIG_DIR}/engine.json"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        *(var.model_dump(exclude_none=True) for var in spec.env),
    ]
    scheduling = spec.scheduling
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": spec.drainTimeoutSeconds + 10,
        "subdomain": workers_service_name(owner),
        "containers": [
            {
                "name": "worker",
                "image": spec.image,
                "imagePullPolicy": spec.imagePullPolicy,
                "command": _serve_args(owner, spec),
                "ports": [{"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"}],
                "env": env,
                "resources": _resources(spec),
                "volumeMounts": mounts,
                **_probes(spec),
            }
        ],
        "volumes": volumes,
    }
    if scheduling.nodeSelector:
        pod_spec["nodeSelector"] = dict(scheduling.nodeSelector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in scheduling.tolerations]
    if scheduling.affinity:
        pod_spec["affinity"] = scheduling.affinity
    if scheduling.priorityClassName:
        pod_spec["priorityClassName"] = scheduling.priorityClassName
    return pod_spec


def engine_settings(owner: Owner, spec: InferenceServiceSpec) -> dict[str, str]:
    """The engine ConfigMap's data: every engine and router setting, as JSON files."""
    engine = {
        "model": {**spec.model.model_dump(exclude_none=True), "servedName": served_model_name(owner, spec)},
        **spec.engine.model_dump(exclude_none=True),
    }
    router = spec.router.model_dump(exclude_none=True)
    return {
        "engine.json": json.dumps(engine, sort_keys=True, indent=2),
        "router.json": json.dumps(router, sort_keys=True, indent=2),
    }


def spec_hash(owner: Owner, spec: InferenceServiceSpec) -> str:
    """A short hash of what a worker runs: its pod template and its engine settings."""
    payload = json.dumps(
        {"template": worker_template(owner, spec), "engine": engine_settings(owner, spec)["engine.json"]},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def worker_pod(owner: Owner, spec: InferenceServiceSpec, index: int, template_hash: str) -> dict[str, Any]:
    labels = {LABEL_ROLE: "worker", LABEL_REPLICA: str(index), LABEL_POOL: DEFAULT_POOL}
    metadata = _metadata(owner, worker_name(owner, index), labels)
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: template_hash}
    spec_ = worker_template(owner, spec)
    spec_["hostname"] = worker_name(owner, index)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec_}


def engine_configmap(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, engine_configmap_name(owner), {}),
        "data": engine_settings(owner, spec),
    }


def workers_service(owner: Owner) -> dict[str, Any]:
    """A headless Service: stable DNS names for the workers, ready or not (the router decides)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, workers_service_name(owner), {LABEL_ROLE: "worker"}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": worker_selector(owner),
            "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def entry_service(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The service's endpoint. It balances over the ready workers; the router takes its place later."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, {LABEL_ROLE: "router"}),
        "spec": {
            "type": spec.router.serviceType,
            "selector": worker_selector(owner),
            "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(owner: Owner) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take one worker at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, owner.name, {}),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": worker_selector(owner)}},
    }


def service_url(owner: Owner, spec: InferenceServiceSpec, entry: dict[str, Any] | None) -> str:
    """Where clients reach the service: the address the local cluster published on the entry
    Service, else the load balancer's address if it has one, else cluster DNS."""
    endpoint = ((entry or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ENDPOINT)
    if endpoint:
        return str(endpoint).rstrip("/")
    port = spec.router.port
    ingress = ((entry or {}).get("status", {}).get("loadBalancer", {}).get("ingress") or [{}])[0]
    host = ingress.get("ip") or ingress.get("hostname")
    if host:
        return f"http://{host}:{port}" if port != 80 else f"http://{host}"
    suffix = "" if port == 80 else f":{port}"
    return f"http://{owner.name}.{owner.namespace}.svc.cluster.local{suffix}"
