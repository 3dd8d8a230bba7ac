"""Every Pod the operator creates (workers of each pool, the router) passes the "restricted"
Pod Security Standard, on CPU and on GPUs, with auth, KV offload and pools."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from kvflock.operator.children import WORKER_UID, Owner
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.operator.reconcile import Observed, reconcile
from tests.pod_security import restricted_violations

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")
NOW = datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC)
WORKER_DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "worker.Dockerfile"

SPECS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu-tp2": {"engine": {"tensorParallelSize": 2}, "resources": {"gpusPerReplica": 2},
                "model": {"source": "pvc", "claimName": "models", "path": "llama"}},
    "gpu-kv-offload": {"resources": {"gpusPerReplica": 1},
                       "engine": {"kvCache": {"cpuOffloadGiB": 4, "diskOffloadGiB": 16}}},
    "hub-model-pvc-cache": {"model": {"source": "hf://org/name@main", "hubCache": {"claimName": "hub"},
                                      "hubTokenSecretRef": {"name": "hf", "key": "token"}}},
    "auth-and-pools": {"auth": {"apiKeySecretRef": {"name": "keys", "key": "api-keys"}},
                       "router": {"pools": [{"name": "short", "maxPromptTokens": 128},
                                            {"name": "long", "minPromptTokens": 128}]}},
}


def _created_pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    plan = reconcile(OWNER, InferenceServiceSpec.model_validate(spec), Observed(), NOW)
    pods = [dict(a.manifest) for a in plan.actions if a.verb == "create" and a.kind == "Pod" and a.manifest]
    assert pods, "the plan creates no pod"
    return pods


@pytest.mark.parametrize("name", SPECS)
def test_every_pod_the_operator_creates_is_restricted(name: str) -> None:
    pods = _created_pods(SPECS[name])
    roles = {pod["metadata"]["labels"]["kvflock.dev/role"] for pod in pods}
    assert roles == {"worker", "router"}
    for pod in pods:
        assert restricted_violations(pod["spec"]) == [], pod["metadata"]["name"]


def test_gpu_workers_still_ask_for_their_gpus() -> None:
    (worker, *_) = [p for p in _created_pods(SPECS["gpu-tp2"]) if p["metadata"]["labels"]["kvflock.dev/role"] == "worker"]
    assert worker["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_a_host_path_model_is_the_one_source_the_profile_refuses() -> None:
    """hostPath volumes are refused from "baseline" up; the checker must see it (and so it sees
    what it is meant to see)."""
    pods = _created_pods({"model": {"source": "hostPath", "hostPath": "/srv/models"}})
    worker = next(p for p in pods if p["metadata"]["labels"]["kvflock.dev/role"] == "worker")
    problems = restricted_violations(worker["spec"])
    assert any("hostPath" in problem for problem in problems), problems


def test_pods_run_as_the_worker_images_numeric_user() -> None:
    users = [line.split()[1] for line in WORKER_DOCKERFILE.read_text().splitlines() if line.startswith("USER ")]
    assert users[-1] == f"{WORKER_UID}:{WORKER_UID}"
    for pod in _created_pods({}):
        context = pod["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (WORKER_UID, WORKER_UID)


def test_the_checker_refuses_a_pod_without_a_security_context() -> None:
    problems = restricted_violations({"containers": [{"name": "c", "image": "x"}]})
    assert {p.split(":")[0] for p in problems} == {"privilege escalation", "running as non-root", "seccomp", "capabilities"}
