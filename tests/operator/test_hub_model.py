"""spec.model.source hf://org/name@revision: the fetch-model init container, the shared cache
volume (a node folder or a PVC), the token Secret as a file, and the worker reading the folder the
init container fills; a malformed source is refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kvflock.operator.children import Owner, worker_template
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.operator.model_check import model_problem

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")
SOURCE = "hf://HuggingFaceTB/SmolLM2-135M-Instruct@v1.0"


def template(**model: Any) -> dict[str, Any]:
    spec = InferenceServiceSpec.model_validate({"model": {"source": SOURCE, **model}, "resources": {"gpusPerReplica": 0},
                                                "env": [{"name": "HF_ENDPOINT", "value": "http://mirror:8080"}]})
    return worker_template(OWNER, spec)


def test_an_hf_source_fetches_into_the_node_cache_before_the_worker_starts() -> None:
    pod = template()
    (init,) = pod["initContainers"]
    assert init["command"] == ["kvflock", "fetch-model", SOURCE, "--cache-dir", "/var/cache/kvflock/hub"]
    assert {"name": "HF_ENDPOINT", "value": "http://mirror:8080"} in init["env"]  # a mirror, as the worker sees it
    assert init["volumeMounts"] == [{"name": "hub-cache", "mountPath": "/var/cache/kvflock/hub"}]
    assert {"name": "hub-cache", "hostPath": {"path": "/var/cache/kvflock/hub", "type": "DirectoryOrCreate"}} \
        in pod["volumes"]
    worker = pod["containers"][0]
    assert {"name": "hub-cache", "mountPath": "/var/cache/kvflock/hub", "readOnly": True} in worker["volumeMounts"]
    # The fetched folder is named on the command line too, where a kubelet without mounts (the local
    # cluster's) points the mount path at the node's folder.
    command = worker["command"]
    assert command[command.index("--model") + 1] == "/var/cache/kvflock/hub/HuggingFaceTB--SmolLM2-135M-Instruct/v1.0"


def test_an_hf_model_is_not_checked_before_it_is_fetched() -> None:
    spec = InferenceServiceSpec.model_validate({"model": {"source": SOURCE}, "resources": {"gpusPerReplica": 0}})
    assert model_problem(spec, shares_worker_files=True) is None


def test_a_pvc_cache_and_a_token_secret() -> None:
    pod = template(hubCache={"claimName": "hub"}, hubTokenSecretRef={"name": "hf", "key": "token"})
    (init,) = pod["initContainers"]
    assert init["command"][-2:] == ["--token-file", "/etc/kvflock-hub/token"]
    assert {"name": "hub-cache", "persistentVolumeClaim": {"claimName": "hub"}} in pod["volumes"]
    assert {"name": "hub-token", "secret": {"secretName": "hf", "items": [{"key": "token", "path": "token"}]}} \
        in pod["volumes"]
    assert all(m["name"] != "hub-token" for m in pod["containers"][0]["volumeMounts"])  # only the fetcher reads it


def test_other_sources_have_no_init_container() -> None:
    spec = InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}})
    assert "initContainers" not in worker_template(OWNER, spec)


@pytest.mark.parametrize("source", ["hf://no-name", "hf://org/name@", "s3://bucket/model", "Demo"])
def test_a_malformed_source_is_refused_naming_the_field(source: str) -> None:
    with pytest.raises(ValidationError, match="model.source"):
        InferenceServiceSpec.model_validate({"model": {"source": source}})
