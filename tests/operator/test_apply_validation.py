"""The local API server refuses at `kubectl apply` what kube-apiserver refuses: the real kubectl
against the emulator with our CRD (its schema, defaults and CEL rules)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvflock.operator.render import render_peering_crds
from tests.operator.conftest import ServerThread

KUBECTL = Path(sys.executable).parent / "kubectl"


class Kubectl:
    """The real kubectl with a kubeconfig for the API server on 127.0.0.1."""

    def __init__(self, url: str, folder: Path) -> None:
        self._folder = folder
        self._kubeconfig = folder / "kubeconfig"
        self._kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": url}}],
            "users": [{"name": "local", "user": {}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local", "namespace": "default"}}],
        }))

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        command = [str(KUBECTL), "--kubeconfig", str(self._kubeconfig), "--cache-dir", str(self._folder / "cache"), *args]
        return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)

    def apply(self, manifest: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        return self("apply", "-f", "-", *args, stdin=json.dumps(manifest))

    def get(self, name: str) -> dict[str, Any]:
        done = self("get", "inferenceservice", name, "-o", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def kubectl(apiserver: ServerThread, tmp_path: Path) -> Kubectl:
    if not KUBECTL.exists():
        pytest.skip(f"needs the real kubectl at {KUBECTL} (make venv installs it)")
    return Kubectl(apiserver.url, tmp_path)


def _service(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": name}, "spec": spec}


def _refused(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode != 0, f"kubectl accepted it: {done.stdout}"
    for text in expected:
        assert text in done.stderr, done.stderr


def test_a_negative_replica_count_is_refused(kubectl: Kubectl) -> None:
    _refused(kubectl.apply(_service("neg", replicas=-1)),
             'The InferenceService "neg" is invalid: spec.replicas: Invalid value: -1:'
             " spec.replicas in body should be greater than or equal to 0")
    assert "not found" in kubectl("get", "inferenceservice", "neg").stderr


def test_a_replica_count_that_is_not_a_number_is_refused(kubectl: Kubectl) -> None:
    _refused(kubectl.apply(_service("two", replicas="two")),
             'spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string"')


def test_a_tensor_parallel_size_outside_the_enum_is_refused(kubectl: Kubectl) -> None:
    _refused(kubectl.apply(_service("tp3", engine={"tensorParallelSize": 3})),
             'spec.engine.tensorParallelSize: Unsupported value: 3: supported values: "1", "2", "4", "8"')


def test_a_replica_of_more_gpus_than_a_node_has_is_refused_naming_the_field(kubectl: Kubectl) -> None:
    _refused(kubectl.apply(_service("tp8pp2", engine={"tensorParallelSize": 8, "pipelineParallelSize": 2})),
             "spec.engine.pipelineParallelSize: Invalid value")


def test_source_path_without_a_path_is_refused_by_the_cel_rule(kubectl: Kubectl) -> None:
    _refused(kubectl.apply(_service("nopath", model={"source": "path"})),
             'spec.model: Invalid value: "object": source=path needs an absolute path')


def test_a_cross_field_rule_on_the_spec_is_enforced(kubectl: Kubectl) -> None:
    spec = {"replicas": 9, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}}
    _refused(kubectl.apply(_service("outside", **spec)),
             "spec: Invalid value: \"object\": with autoscaling enabled, replicas must lie within")


def test_every_failing_field_is_listed(kubectl: Kubectl) -> None:
    done = kubectl.apply(_service("many", replicas=-1, drainTimeoutSeconds=99999, image=""))
    _refused(done, "spec.replicas: Invalid value: -1", "spec.drainTimeoutSeconds: Invalid value: 99999",
             'spec.image: Invalid value: "": spec.image in body should be at least 1 chars long')


def test_adapters_with_tensor_parallelism_are_refused_naming_the_field(kubectl: Kubectl) -> None:
    spec = {"engine": {"tensorParallelSize": 2}, "resources": {"gpusPerReplica": 2},
            "adapters": [{"name": "sql", "source": {"path": "/models/adapters/sql"}}]}
    _refused(kubectl.apply(_service("tp2-lora", **spec)),
             "spec.adapters: Invalid value", "adapters work with one GPU per replica only")


def test_duplicate_adapter_names_are_refused(kubectl: Kubectl) -> None:
    adapters = [{"name": "sql", "source": {"path": "/a"}}, {"name": "sql", "source": {"path": "/b"}}]
    _refused(kubectl.apply(_service("twice", engine={"lora": {}}, adapters=adapters)),
             "spec.adapters: Invalid value", "adapter names must be unique")


def test_a_misspelt_field_is_refused_by_strict_field_validation(kubectl: Kubectl) -> None:
    _refused(kubectl.apply(_service("typo", replica=2)), 'strict decoding error: unknown field "spec.replica"')
    _refused(kubectl.apply(_service("typo2", engine={"maxNumSeq": 8})),
             'unknown field "spec.engine.maxNumSeq"')


def test_a_misspelt_field_in_a_later_apply_is_refused_too(kubectl: Kubectl) -> None:
    assert kubectl.apply(_service("later", replicas=1)).returncode == 0
    _refused(kubectl.apply(_service("later", replicas=1, replica=2)), 'unknown field "spec.replica"')
    _refused(kubectl.apply(_service("later", replicas=-3)), "spec.replicas: Invalid value: -3")
    assert kubectl.get("later")["spec"]["replicas"] == 1


def test_warn_drops_a_misspelt_field_with_a_warning_and_ignore_silently(kubectl: Kubectl) -> None:
    done = kubectl.apply(_service("warned", replica=2), "--validate=warn")
    assert done.returncode == 0, done.stderr
    assert 'Warning: unknown field "spec.replica"' in done.stderr
    assert "replica" not in kubectl.get("warned")["spec"]
    done = kubectl.apply(_service("ignored", replica=2), "--validate=false")
    assert done.returncode == 0 and "unknown field" not in done.stderr, done.stderr
    assert "replica" not in kubectl.get("ignored")["spec"]


def test_a_valid_service_is_stored_with_the_crd_defaults(kubectl: Kubectl) -> None:
    done = kubectl.apply(_service("fine", replicas=2, engine={"maxNumSeqs": 8}))
    assert done.returncode == 0, done.stderr
    spec = kubectl.get("fine")["spec"]
    assert spec["replicas"] == 2 and spec["engine"]["maxNumSeqs"] == 8
    assert spec["engine"]["tensorParallelSize"] == 1 and spec["engine"]["kvCache"]["blockSize"] == 16
    assert spec["model"] == {"source": "demo", "format": "auto", "hubCache": {"hostPath": "/var/cache/kvflock/hub"}}
    assert spec["router"]["pools"] == [] and spec["drainTimeoutSeconds"] == 60


def test_the_scale_subresource_validates(kubectl: Kubectl) -> None:
    assert kubectl.apply(_service("scaled")).returncode == 0
    _refused(kubectl("scale", "inferenceservice", "scaled", "--replicas=5000"),
             "spec.replicas: Invalid value: 5000: spec.replicas in body should be less than or equal to 1000")
    assert kubectl("scale", "inferenceservice", "scaled", "--replicas=3").returncode == 0
    assert kubectl.get("scaled")["spec"]["replicas"] == 3


def test_server_side_apply_validates_and_creates(kubectl: Kubectl) -> None:
    _refused(kubectl.apply(_service("ssa", replicas=-1), "--server-side"), "spec.replicas: Invalid value: -1")
    _refused(kubectl.apply(_service("ssa", replica=1), "--server-side"), 'unknown field "spec.replica"')
    done = kubectl.apply(_service("ssa", replicas=2), "--server-side")
    assert done.returncode == 0, done.stderr
    assert kubectl.get("ssa")["spec"]["replicas"] == 2


def test_replace_validates(kubectl: Kubectl) -> None:
    assert kubectl.apply(_service("replaced")).returncode == 0
    stored = kubectl.get("replaced")
    stored["spec"]["engine"]["tensorParallelSize"] = 3
    _refused(kubectl("replace", "-f", "-", stdin=json.dumps(stored)), "spec.engine.tensorParallelSize: Unsupported value: 3")
    stored["spec"]["engine"]["tensorParallelSize"] = 2
    stored["spec"]["resources"] = {"gpusPerReplica": 2}
    done = kubectl("replace", "-f", "-", stdin=json.dumps(stored))
    assert done.returncode == 0, done.stderr
    assert kubectl.get("replaced")["spec"]["engine"]["tensorParallelSize"] == 2


def test_a_kopf_peering_keeps_its_kind_and_its_peers_and_kubectl_reads_it(apiserver: ServerThread,
                                                                           kubectl: Kubectl) -> None:
    for crd in render_peering_crds():
        apiserver.api.install_crd(crd)
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "leaders"}}
    done = kubectl.apply(peering)
    assert done.returncode == 0, done.stderr
    for name, priority in (("op-a", 3), ("op-b", 7)):  # each replica's keep-alive, a merge patch as kopf sends it
        keepalive = {"status": {name: {"priority": priority, "lifetime": 10, "lastseen": "2026-12-07T18:00:00"}}}
        done = kubectl("patch", "clusterkopfpeering", "leaders", "--type=merge", "-p", json.dumps(keepalive))
        assert done.returncode == 0, done.stderr
    done = kubectl("get", "clusterkopfpeering", "leaders", "-o", "json")
    assert done.returncode == 0, done.stderr
    stored = json.loads(done.stdout)
    assert stored["kind"] == "ClusterKopfPeering" and stored["apiVersion"] == "kopf.dev/v1"
    assert {name: peer["priority"] for name, peer in stored["status"].items()} == {"op-a": 3, "op-b": 7}
