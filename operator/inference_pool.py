"""The Gateway API Inference Extension's children of an InferenceService with `spec.inferencePool`:
an InferencePool (inference.networking.k8s.io/v1) over the service's workers, and the `<name>-epp`
ConfigMap with the flags its endpoint picker needs to read kvflock's workers.

The picker itself (and the gateway) are installed with the extension's own chart; kvflock only
describes its workers to them. The picker scrapes each worker's /metrics for vLLM's gauge names,
which the workers export beside their kvflock_ names (kvflock.shared.metrics).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from kvflock.operator.children import Owner, worker_selector
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.shared.metrics import VLLM_KV_CACHE_USAGE, VLLM_REQUESTS_RUNNING, VLLM_REQUESTS_WAITING
from kvflock.shared.names import LABEL_SERVICE, WORKER_PORT

GROUP = "inference.networking.k8s.io"
VERSION = "v1"
KIND = "InferencePool"
PLURAL = "inferencepools"
API_VERSION = f"{GROUP}/{VERSION}"
# The key of the `<name>-epp` ConfigMap that holds the picker's command-line flags, one a line.
PICKER_FLAGS_KEY = "flags"


def picker_service_name(owner: Owner, spec: InferenceServiceSpec) -> str:
    assert spec.inferencePool is not None
    return spec.inferencePool.endpointPicker.serviceName or f"{owner.name}-epp"


def picker_flags(owner: Owner) -> list[str]:
    """The endpoint picker's flags for this pool and kvflock's workers (the extension's
    `inferencepool` chart takes them as `inferenceExtension.flags`)."""
    return [
        f"--pool-name={owner.name}",
        f"--pool-namespace={owner.namespace}",
        f"--pool-group={GROUP}",
        "--model-server-metrics-path=/metrics",
        "--model-server-metrics-scheme=http",
        f"--total-queued-requests-metric={VLLM_REQUESTS_WAITING}",
        f"--total-running-requests-metric={VLLM_REQUESTS_RUNNING}",
        f"--kv-cache-usage-percentage-metric={VLLM_KV_CACHE_USAGE}",
    ]


def _metadata(owner: Owner, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": {LABEL_SERVICE: owner.name},
            "ownerReferences": [owner.reference]}


def inference_pool(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The InferencePool named after the service: every worker of it (all its length pools), on
    the workers' container port, behind the picker's Service."""
    assert spec.inferencePool is not None
    picker = spec.inferencePool.endpointPicker
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "selector": {"matchLabels": worker_selector(owner)},
            "targetPorts": [{"number": WORKER_PORT}],
            "appProtocol": "http",  # the workers serve HTTP/1.1
            "endpointPickerRef": {
                "group": "", "kind": "Service", "name": picker_service_name(owner, spec),
                "port": {"number": picker.port}, "failureMode": picker.failureMode,
            },
        },
    }


def picker_configmap(owner: Owner) -> dict[str, Any]:
    """`<name>-epp`: the flags above, for whoever installs the picker (a GitOps tool can read them)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, f"{owner.name}-epp"),
        "data": {PICKER_FLAGS_KEY: "\n".join(picker_flags(owner)) + "\n"},
    }


def children(owner: Owner, spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """What `spec.inferencePool` adds to a service's children (nothing without it)."""
    return [] if spec.inferencePool is None else [inference_pool(owner, spec), picker_configmap(owner)]


def leftovers(owner: Owner, spec: InferenceServiceSpec, existing: Container[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (kind, name) of this service's pool children that exist though `spec.inferencePool`
    was removed: they go with the field, as its workers' gateway access does."""
    if spec.inferencePool is not None:
        return []
    return [key for key in ((KIND, owner.name), ("ConfigMap", f"{owner.name}-epp")) if key in existing]
