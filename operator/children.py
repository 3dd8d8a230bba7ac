"""Manifests of an InferenceService's children: worker Pods, Services, ConfigMap, PodDisruptionBudget.

Plain functions from the validated spec to Kubernetes objects as dicts; no I/O. A worker reads
its engine settings from its engine config file, EngineConfig's fields as JSON (`engine_config`),
which the engine ConfigMap holds (`engine.json`, and `engine-<pool>.json` for each of
`router.pools`) and every worker pod mounts at /etc/kvflock: its command is `kvflock serve
--config <that file>` plus what is not an engine setting (address, served name, access files).
The workers' spec hash covers the pod template and the engine config, so any change to either
rolls the workers (see `reconcile`); a worker reads the file only when it starts. With
`engine.lora`, the ConfigMap also lists `spec.adapters` (`adapters.json`), which a worker loads
when it starts (`--lora-modules-file`); that list is not in the spec hash, so changing it rolls
nothing (the operator loads and unloads adapters in running workers: kvflock.operator.adapters).
With `spec.auth`, the pods mount the user's API-key Secret and the operator's own
`<name>-internal` Secret (internal and admin tokens) as files, never as values; a keyed hash of
both Secrets' contents (`auth_hash`, computed by the operator) joins the spec hash and the pod's
`kvflock.dev/auth-hash` annotation, so a new key in the same Secret rolls the pods just as a new
Secret reference does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from kvflock.operator.crd import API_VERSION, KIND, InferenceServiceSpec, PoolSpec
from kvflock.shared.hub import SCHEME as HUB_SCHEME
from kvflock.shared.hub import HubSource
from kvflock.shared.hub import model_dir as hub_model_dir
from kvflock.shared.names import (
    ANNOTATION_AUTH_HASH,
    ANNOTATION_ENDPOINT,
    ANNOTATION_SPEC_HASH,
    DEFAULT_POOL,
    LABEL_POOL,
    LABEL_REPLICA,
    LABEL_ROLE,
    LABEL_SERVICE,
    ROLE_ROUTER,
    ROLE_WORKER,
    WORKER_PORT,
)

ENGINE_CONFIG_DIR = "/etc/kvflock"
ADAPTERS_FILE = "adapters.json"
MODELS_DIR = "/models"
# Where an hf:// model's cache volume is mounted (read-write in the fetch-model init container),
# and its token Secret's file.
HUB_CACHE_DIR = "/var/cache/kvflock/hub"
HUB_TOKEN_DIR = "/etc/kvflock-hub"
HUB_TOKEN_FILE = "token"
# The API keys' Secret is mounted beside, not inside, ENGINE_CONFIG_DIR: a mount point nested in
# a (read-only) ConfigMap volume cannot be created by the container runtime.
AUTH_DIR = "/etc/kvflock-auth"
API_KEY_FILE = "api-keys"
# The operator's per-service Secret: the router's token for the workers, the operator's for /admin/*.
INTERNAL_DIR = "/etc/kvflock-internal"
INTERNAL_TOKEN_KEY = "internal-token"
ADMIN_TOKEN_KEY = "admin-token"
# The worker image's user and group (docker/worker.Dockerfile), which the workers and the router
# run as: numeric, so that the kubelet can check runAsNonRoot whatever image spec.image names.
WORKER_UID = 10001


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
    return {LABEL_SERVICE: owner.name, LABEL_ROLE: ROLE_WORKER}


def selector_string(owner: Owner) -> str:
    return ",".join(f"{k}={v}" for k, v in worker_selector(owner).items())


def worker_name(owner: Owner, index: int, pool: str = DEFAULT_POOL) -> str:
    """`<name>-w-<n>`, or `<name>-<pool>-w-<n>` for a worker of one of `router.pools`."""
    return f"{owner.name}-w-{index}" if pool == DEFAULT_POOL else f"{owner.name}-{pool}-w-{index}"


def pool_spec(spec: InferenceServiceSpec, pool: PoolSpec) -> InferenceServiceSpec:
    """The spec a pool's workers run: the service's, with the pool's replicas, resources and engine.

    A pool without `replicas` follows `spec.replicas`, which is what kubectl scale and the
    autoscaler write."""
    replicas = spec.replicas if pool.replicas is None else pool.replicas
    resources = pool.resources if pool.resources is not None else spec.resources
    return spec.model_copy(update={"replicas": replicas, "resources": resources, "engine": spec.pool_engine(pool)})


def workers_service_name(owner: Owner) -> str:
    return f"{owner.name}-workers"


def engine_configmap_name(owner: Owner) -> str:
    return f"{owner.name}-engine"


def internal_secret_name(owner: Owner) -> str:
    return f"{owner.name}-internal"


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
    if model.source.startswith(HUB_SCHEME):
        return str(hub_model_dir(PurePosixPath(HUB_CACHE_DIR), HubSource.parse(model.source)))
    return posixpath.normpath(posixpath.join(MODELS_DIR, model.path or "."))


def engine_file(pool: str = DEFAULT_POOL) -> str:
    """The engine ConfigMap's key, and file name under ENGINE_CONFIG_DIR, of a pool's engine config."""
    return "engine.json" if pool == DEFAULT_POOL else f"engine-{pool}.json"


def engine_config(spec: InferenceServiceSpec) -> dict[str, Any]:
    """A worker's engine config: EngineConfig's fields (kvflock.worker.config) from the spec."""
    return {"model": _model_argument(spec), "load_format": spec.model.format, **spec.engine.engine_config()}


def _serve_args(owner: Owner, spec: InferenceServiceSpec, pool: str) -> list[str]:
    args = [
        "kvflock", "serve",
        "--config", f"{ENGINE_CONFIG_DIR}/{engine_file(pool)}",
        "--served-model-name", served_model_name(owner, spec),
        "--host", "0.0.0.0",
        "--port", str(WORKER_PORT),
    ]
    # Also in the file; on the command line too because each is where this pod mounts a volume
    # (`_volumes`), and the local cluster's kubelet points mount paths there at the volume's folder.
    if spec.model.source.startswith(HUB_SCHEME):
        args += ["--model", _model_argument(spec)]
    kv = spec.engine.kvCache
    if kv.diskOffloadGiB > 0:
        args += ["--kv-offload-disk-path", kv.diskPath]
    if spec.engine.lora is not None:
        args += ["--lora-modules-file", f"{ENGINE_CONFIG_DIR}/{ADAPTERS_FILE}"]
    return args + auth_args(owner, spec, "worker")


def auth_args(owner: Owner, spec: InferenceServiceSpec, role: str) -> list[str]:
    """The access flags of a `worker` or `router` pod's command: paths, never keys.

    The router checks the users' keys and shows the workers the internal token; a worker then
    accepts only that token on /v1/* (a user key sent to it directly is refused) and only the
    operator's admin token on /admin/*. With `inferencePool`, a gateway's proxy calls the workers
    with the user's own key, so they accept the users' keys as well.
    """
    if spec.auth is None:
        return []
    internal = ["--internal-token-file", f"{INTERNAL_DIR}/{INTERNAL_TOKEN_KEY}"]
    user_keys = ["--api-key-file", f"{AUTH_DIR}/{API_KEY_FILE}"]
    if role == "router":
        return [*user_keys, *internal]
    if role == "worker":
        gateway = user_keys if spec.inferencePool is not None else []
        return [*internal, *gateway, "--admin-token-file", f"{INTERNAL_DIR}/{ADMIN_TOKEN_KEY}"]
    raise ValueError(f"role: must be 'worker' or 'router', got {role!r}")


def auth_volumes(owner: Owner, spec: InferenceServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The Secret volumes (and their mounts) that `auth_args`' paths point into; the same for
    workers and routers, each reading the files its flags name."""
    if spec.auth is None:
        return [], []
    ref = spec.auth.apiKeySecretRef
    volumes = [
        {"name": "api-keys", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": API_KEY_FILE}]}},
        {"name": "internal-tokens", "secret": {"secretName": internal_secret_name(owner)}},
    ]
    mounts = [
        {"name": "api-keys", "mountPath": AUTH_DIR, "readOnly": True},
        {"name": "internal-tokens", "mountPath": INTERNAL_DIR, "readOnly": True},
    ]
    return volumes, mounts


def internal_secret(owner: Owner, tokens: Mapping[str, str]) -> dict[str, Any]:
    """The operator's Secret of a service with auth: its internal and admin tokens."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(owner, internal_secret_name(owner), {}),
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in tokens.items()},
    }


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
        # The Pod Security Standards refuse hostPath volumes from "baseline" up: such a
        # service runs only in a namespace that admits privileged pods.
        volumes.append({"name": "models", "hostPath": {"path": model.hostPath, "type": "Directory"}})
    if model.source in ("pvc", "hostPath"):
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    if model.source.startswith(HUB_SCHEME):
        cache = model.hubCache
        volumes.append({"name": "hub-cache", **(
            {"persistentVolumeClaim": {"claimName": cache.claimName}} if cache.claimName
            else {"hostPath": {"path": cache.hostPath, "type": "DirectoryOrCreate"}})})
        mounts.append({"name": "hub-cache", "mountPath": HUB_CACHE_DIR, "readOnly": True})
        if model.hubTokenSecretRef is not None:
            ref = model.hubTokenSecretRef
            volumes.append({"name": "hub-token", "secret": {"secretName": ref.name,
                                                            "items": [{"key": ref.key, "path": HUB_TOKEN_FILE}]}})
    kv = spec.engine.kvCache
    if kv.diskOffloadGiB > 0:
        volumes.append({"name": "kv-disk", "emptyDir": {"sizeLimit": f"{int(kv.diskOffloadGiB * 1024)}Mi"}})
        mounts.append({"name": "kv-disk", "mountPath": kv.diskPath})
    if spec.engine.layout.world_size > 1:  # ranks exchange tensors through shared memory
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    auth_volumes_, auth_mounts = auth_volumes(owner, spec)
    return volumes + auth_volumes_, mounts + auth_mounts


def pod_security_context() -> dict[str, Any]:
    """The pod-level half of the "restricted" Pod Security Standard, for workers and router."""
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """The container-level half: no privilege escalation, no Linux capabilities. The root
    filesystem stays writable: the engine's compile caches live in the image user's home."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


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
        # Every second on /ready while loading: the worker listens (and /health answers) before
        # its model is loaded, so a startup probe on /health passed at once and the first
        # readiness check failed, leaving a restarted worker unready for up to a whole period
        # after it could serve. On /ready, readiness is checked (and passes) within a second of
        # the load; a load that never ends is killed after startupSeconds.
        "startupProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "failureThreshold": timing.startupSeconds,
            "periodSeconds": 1,
            "timeoutSeconds": timing.timeoutSeconds,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "failureThreshold": timing.failureThreshold,
            **common,
        },
    }


def _fetch_model_container(spec: InferenceServiceSpec, env: list[dict[str, Any]]) -> dict[str, Any]:
    """The init container of an hf:// model: `kvflock fetch-model` into the shared cache (it resumes
    what an interrupted fetch left, and the worker starts only once every file is verified)."""
    model = spec.model
    command = ["kvflock", "fetch-model", model.source, "--cache-dir", HUB_CACHE_DIR]
    mounts = [{"name": "hub-cache", "mountPath": HUB_CACHE_DIR}]
    if model.hubTokenSecretRef is not None:
        command += ["--token-file", f"{HUB_TOKEN_DIR}/{HUB_TOKEN_FILE}"]
        mounts.append({"name": "hub-token", "mountPath": HUB_TOKEN_DIR, "readOnly": True})
    return {"name": "fetch-model", "image": spec.image, "imagePullPolicy": spec.imagePullPolicy,
            "command": command, "env": env, "volumeMounts": mounts, "securityContext": container_security_context()}


def worker_template(owner: Owner, spec: InferenceServiceSpec, pool: str = DEFAULT_POOL) -> dict[str, Any]:
    """The pod spec shared by all workers of the current spec (of `pool`: its engine config file)."""
    volumes, mounts = _volumes(owner, spec)
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        *(var.model_dump(exclude_none=True) for var in spec.env),
    ]
    scheduling = spec.scheduling
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": spec.drainTimeoutSeconds + 10,
        "subdomain": workers_service_name(owner),
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": "worker",
                "image": spec.image,
                "imagePullPolicy": spec.imagePullPolicy,
                "command": _serve_args(owner, spec, pool),
                "ports": [{"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"}],
                "env": env,
                "resources": _resources(spec),
                "volumeMounts": mounts,
                # A worker that dies says why in its last log lines; they become the termination
                # message, which the operator puts in the service's Degraded condition.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": container_security_context(),
                **_probes(spec),
            }
        ],
        "volumes": volumes,
    }
    if spec.model.source.startswith(HUB_SCHEME):
        pod_spec["initContainers"] = [_fetch_model_container(spec, env)]
    if scheduling.nodeSelector:
        pod_spec["nodeSelector"] = dict(scheduling.nodeSelector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in scheduling.tolerations]
    if scheduling.affinity:
        pod_spec["affinity"] = scheduling.affinity
    if scheduling.priorityClassName:
        pod_spec["priorityClassName"] = scheduling.priorityClassName
    return pod_spec


def engine_settings(spec: InferenceServiceSpec) -> dict[str, str]:
    """The engine ConfigMap's data: each pool's engine config file and the router's settings."""
    files = {engine_file(): engine_config(spec)}
    for pool in spec.router.pools:  # a pool named "default" has the default file: its workers read it
        files[engine_file(pool.name)] = engine_config(pool_spec(spec, pool))
    # A worker that starts loads these; a mounted ConfigMap follows changes within a minute or so.
    adapters = {a.name: a.source.path for a in spec.adapters} if spec.engine.lora is not None else None
    return {
        **{name: json.dumps(config, sort_keys=True, indent=2) for name, config in files.items()},
        "router.json": json.dumps(_router_config(spec), sort_keys=True, indent=2),
        **({ADAPTERS_FILE: json.dumps(adapters, indent=2)} if adapters is not None else {}),
    }


def _router_config(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The router's own settings (kvflock.router.config.RouterConfig): how to route, and the
    block size the workers hash their prefixes with."""
    router = spec.router
    return {
        "policy": router.policy,
        "pools": [{"name": p.name, "minPromptTokens": p.minPromptTokens,
                   **({"maxPromptTokens": p.maxPromptTokens} if p.maxPromptTokens is not None else {})}
                  for p in router.pools],
        "holdTimeoutSeconds": router.holdTimeoutSeconds,
        "scaleFromZero": spec.autoscaling.enabled and spec.autoscaling.minReplicas == 0,
        "blockSize": spec.engine.kvCache.blockSize,
    }


def spec_hash(owner: Owner, spec: InferenceServiceSpec, auth_hash: str | None = None) -> str:
    """A short hash of what a worker runs: its pod template, its engine config, and the
    contents of the Secrets it mounts (`auth_hash`; pods read their keys once, at start). The
    template is the default pool's: a pool's workers differ in the name of their engine config
    file only, which follows the pool as their names do."""
    payload = json.dumps(
        {"template": worker_template(owner, spec), "engine": engine_config(spec),
         **({"auth": auth_hash} if auth_hash else {})},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def worker_pod(owner: Owner, spec: InferenceServiceSpec, index: int, template_hash: str,
               auth_hash: str | None = None, pool: str = DEFAULT_POOL) -> dict[str, Any]:
    """A worker of `pool` (its `spec` from `pool_spec` for one of `router.pools`)."""
    labels = {LABEL_ROLE: ROLE_WORKER, LABEL_REPLICA: str(index), LABEL_POOL: pool}
    metadata = _metadata(owner, worker_name(owner, index, pool), labels)
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: template_hash}
    if auth_hash:
        metadata["annotations"][ANNOTATION_AUTH_HASH] = auth_hash
    spec_ = worker_template(owner, spec, pool)
    # A DNS label unique within the workers' headless Service (the subdomain), however long the names.
    spec_["hostname"] = worker_name(owner, index) if pool == DEFAULT_POOL else f"{pool}-w-{index}"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec_}


def engine_configmap(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, engine_configmap_name(owner), {}),
        "data": engine_settings(spec),
    }


def workers_service(owner: Owner) -> dict[str, Any]:
    """A headless Service: stable DNS names for the workers, ready or not (the router decides)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, workers_service_name(owner), {LABEL_ROLE: ROLE_WORKER}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": worker_selector(owner),
            "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def entry_service(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The service's endpoint: it selects the router pod (`router_children.router_pod`)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, {LABEL_ROLE: ROLE_ROUTER}),
        "spec": {
            "type": spec.router.serviceType,
            "selector": {LABEL_SERVICE: owner.name, LABEL_ROLE: ROLE_ROUTER},
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
