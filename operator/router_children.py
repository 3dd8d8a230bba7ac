"""Manifests of an InferenceService's routers: their Pods (`ROUTER_REPLICAS` of them, so that
one restarting or replaced never leaves the entry Service without a router), their
PodDisruptionBudget, and the ServiceAccount, Role and RoleBinding that let them find the workers
through the API server.

The router pod runs `kvflock router --service <name>`: it lists and watches the service's
worker Pods and reads the `<name>-engine` ConfigMap (its router.json: pools, policy, hold
timeout and the block size it hashes prefixes by), exactly what its Role grants. The entry
Service selects it (`children.entry_service`), so clients reach the
workers through it. It mounts the same access-control files as the workers (`children.auth_volumes`)
and takes the router's share of the flags (`children.auth_args`). Plain functions, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvflock.operator import children
from kvflock.operator.children import Owner
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.shared.names import ANNOTATION_SPEC_HASH, LABEL_ROLE, LABEL_SERVICE, ROLE_ROUTER, ROUTER_PORT

RBAC_GROUP = "rbac.authorization.k8s.io"

# Routers behind the entry Service. They hold no state worth keeping (each finds the workers
# itself), so two are enough to keep one serving while the other restarts or is replaced.
ROUTER_REPLICAS = 2

# (apiGroup, resource, verbs) the router's own calls need: kvflock.router.discovery lists
# and watches the worker pods and reads the engine ConfigMap. The operator must hold these
# verbs itself to grant them (Kubernetes refuses to let a Role escalate its creator's rights).
ROUTER_RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    ("", "pods", ("list", "watch")),
    ("", "configmaps", ("get",)),
]


def router_name(owner: Owner) -> str:
    """The name of the routers' ServiceAccount, Role, RoleBinding and PodDisruptionBudget."""
    return f"{owner.name}-router"


def router_pod_name(owner: Owner, index: int) -> str:
    return f"{router_name(owner)}-{index}"


def router_selector(owner: Owner) -> dict[str, str]:
    return {LABEL_SERVICE: owner.name, LABEL_ROLE: ROLE_ROUTER}


def _metadata(owner: Owner, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": router_selector(owner),
        "ownerReferences": [owner.reference],
    }


def _router_args(owner: Owner, spec: InferenceServiceSpec) -> list[str]:
    return [
        "kvflock", "router",
        "--service", owner.name,
        "--namespace", owner.namespace,
        "--host", "0.0.0.0",
        "--port", str(ROUTER_PORT),
        *children.auth_args(owner, spec, "router"),
    ]


def _router_pod_spec(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    volumes, mounts = children.auth_volumes(owner, spec)
    http = {"path": "/health", "port": "http"}
    return {
        "restartPolicy": "Always",
        "serviceAccountName": router_name(owner),
        "terminationGracePeriodSeconds": 30,
        "securityContext": children.pod_security_context(),
        "containers": [
            {
                "name": "router",
                "image": spec.image,
                "imagePullPolicy": spec.imagePullPolicy,
                "command": _router_args(owner, spec),
                "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                "volumeMounts": mounts,
                "securityContext": children.container_security_context(),
                # Ready once it routes: with a hold timeout it also takes requests while no
                # replica is ready (scale from zero), so it stays in the entry Service then.
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2,
                                   "timeoutSeconds": 2, "failureThreshold": 2},
                "startupProbe": {"httpGet": http, "periodSeconds": 1, "timeoutSeconds": 2, "failureThreshold": 120},
                "livenessProbe": {"httpGet": http, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3},
            }
        ],
        "volumes": volumes,
    }


def router_pod(owner: Owner, spec: InferenceServiceSpec, auth_hash: str | None = None, index: int = 0) -> dict[str, Any]:
    """Router Pod number `index`, annotated with the hash of its spec and of the keys it reads
    at start (`auth_hash`, as for the workers): a change to either replaces it."""
    pod_spec = _router_pod_spec(owner, spec)
    metadata = _metadata(owner, router_pod_name(owner, index))
    payload = json.dumps({"spec": pod_spec, **({"auth": auth_hash} if auth_hash else {})}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: digest}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def router_disruption_budget(owner: Owner) -> dict[str, Any]:
    """Voluntary disruptions (node drains) leave at least one router running."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, router_name(owner)),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": router_selector(owner)}},
    }


def router_service_account(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(owner, router_name(owner))}


def router_role(owner: Owner) -> dict[str, Any]:
    rules = [{"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}
             for group, resource, verbs in ROUTER_RBAC_RULES]
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "Role", "metadata": _metadata(owner, router_name(owner)),
            "rules": rules}


def router_role_binding(owner: Owner) -> dict[str, Any]:
    name = router_name(owner)
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(owner, name),
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }
