"""The CRD: rendered from the models, committed as rendered, and as strict as the models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvflock.operator.crd import InferenceServiceSpec, format_errors
from kvflock.operator.render import crd_files, render_crd
from pydantic import ValidationError

from kvflock.cli import main

from .schema import schema_errors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _service(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "x"}, "spec": spec}


def test_committed_crd_equals_the_rendered_one() -> None:
    for name, text in crd_files().items():
        assert (ROOT / "crds" / name).read_text() == text, "crds/ is stale: run `kvflock crds`"


def test_crds_check_fails_when_a_file_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds", "--output-dir", str(tmp_path)]) == 0
    assert main(["crds", "--check", "--output-dir", str(tmp_path)]) == 0
    path = tmp_path / "inferenceservice.yaml"
    path.write_text(path.read_text().replace("infsvc", "isvc"))
    assert main(["crds", "--check", "--output-dir", str(tmp_path)]) == 1
    assert "differs" in capsys.readouterr().out


def test_crd_has_names_subresources_and_printer_columns() -> None:
    crd = render_crd()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "inferenceservices.kvflock.dev"
    assert crd["spec"]["names"]["shortNames"] == ["infsvc"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = ["Model", "Layout", "Replicas", "Ready", "URL", "Age"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == columns


def test_schema_has_bounds_enums_defaults_and_descriptions() -> None:
    spec = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    replicas = spec["properties"]["replicas"]
    assert (replicas["type"], replicas["minimum"], replicas["default"]) == ("integer", 0, 1)
    engine = spec["properties"]["engine"]["properties"]
    assert engine["tensorParallelSize"]["enum"] == [1, 2, 4, 8]
    assert engine["kvCache"]["properties"]["dtype"]["enum"] == ["auto", "fp8"]
    assert engine["kvCache"]["default"] == {}
    assert all("description" in prop for prop in engine.values())
    text = yaml.safe_dump(render_crd())
    assert "$ref" not in text and "anyOf" not in text and "null" not in text


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid_against_the_crd_schema(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert schema_errors(obj) == []
    InferenceServiceSpec.model_validate(obj["spec"])


def test_examples_cover_cpu_demo_one_gpu_tensor_and_pipeline_parallel_auth_the_hub_and_a_gateway() -> None:
    specs = [InferenceServiceSpec.model_validate(yaml.safe_load(p.read_text())["spec"]) for p in EXAMPLES]
    assert any(s.model.source == "demo" and s.gpus == 0 for s in specs)
    assert any(s.model.source.startswith("hf://") and s.inferencePool is not None for s in specs)
    assert any(s.engine.tensorParallelSize == 1 and s.gpus == 1 for s in specs)
    assert any(s.engine.tensorParallelSize == 2 and s.gpus == 2 for s in specs)
    assert any(s.engine.layout.label == "TP4xPP2" and s.gpus == 8 for s in specs)
    assert any(s.auth is not None for s in specs) and any(s.auth is None for s in specs)


# Each bad spec: (spec, the field the model's error names). Both the API server's schema (with
# its CEL rules) and the pydantic models must reject it.
BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"replicas": -1}, "spec.replicas"),
    ({"engine": {"tensorParallelSize": 3}}, "spec.engine.tensorParallelSize"),
    ({"engine": {"kvCache": {"blockSize": 7}}}, "spec.engine.kvCache.blockSize"),
    ({"engine": {"kvCache": {"gpuMemoryUtilization": 1.5}}}, "spec.engine.kvCache.gpuMemoryUtilization"),
    ({"engine": {"maxNumBatchedTokens": 16, "kvCache": {"blockSize": 32}}}, "maxNumBatchedTokens"),
    ({"engine": {"prefixCaching": False, "kvCache": {"cpuOffloadGiB": 4}}}, "prefixCaching"),
    ({"engine": {"tensorParallelSize": 2, "kvCache": {"diskOffloadGiB": 8}}, "resources": {"gpusPerReplica": 2}},
     "tensorParallelSize"),
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "autoscaling.minReplicas"),
    ({"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 3}, "replicas": 1}, "replicas"),
    ({"engine": {"tensorParallelSize": 2}, "resources": {"gpusPerReplica": 1}}, "resources.gpusPerReplica"),
    ({"engine": {"pipelineParallelSize": 0}}, "spec.engine.pipelineParallelSize"),
    ({"engine": {"tensorParallelSize": 8, "pipelineParallelSize": 2}},
     "engine.pipelineParallelSize: TP8xPP2 is 16 GPUs"),
    ({"engine": {"tensorParallelSize": 2, "pipelineParallelSize": 2}, "resources": {"gpusPerReplica": 2}},
     "resources.gpusPerReplica"),
    ({"engine": {"pipelineParallelSize": 2, "kvCache": {"cpuOffloadGiB": 4}}}, "pipelineParallelSize"),
    ({"engine": {"contextParallelSize": 3}, "resources": {"gpusPerReplica": 3}}, "engine.contextParallelSize: 3 does not divide"),
    ({"model": {"source": "pvc"}}, "model.claimName"),
    ({"model": {"source": "path", "path": "relative/dir"}}, "model.path"),
    ({"model": {"source": "hostPath"}}, "model.hostPath"),
    ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
    ({"router": {"pools": [{"name": "a"}, {"name": "a"}]}}, "router.pools"),
    ({"router": {"pools": [{"name": "a", "minPromptTokens": 9, "maxPromptTokens": 3}]}}, "minPromptTokens"),
    ({"router": {"pools": [{"name": "a", "resources": {"gpusPerReplica": 2}}]}}, "router.pools[a].resources"),
    ({"router": {"pools": [{"name": "a", "engine": {"maxNumBatchedTokens": 16}}]}, "engine": {"kvCache": {"blockSize": 32}}},
     "router.pools[a].engine"),
    ({"router": {"pools": [{"name": "a", "replicas": -1}]}}, "router.pools.0.replicas"),
    ({"router": {"holdTimeoutSeconds": -1}}, "router.holdTimeoutSeconds"),
    ({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
    ({"auth": {}}, "spec.auth.apiKeySecretRef"),
    ({"auth": {"apiKeySecretRef": {"name": "keys"}}}, "spec.auth.apiKeySecretRef.key"),
    ({"auth": {"apiKeySecretRef": {"name": "Keys!", "key": "k"}}}, "spec.auth.apiKeySecretRef.name"),
    ({"adapters": [{"name": "sql", "source": {"path": "/a/sql"}}]}, "adapters: set engine.lora"),
    ({"engine": {"lora": {}},
      "adapters": [{"name": "sql", "source": {"path": "/a"}}, {"name": "sql", "source": {"path": "/b"}}]},
     "adapters: names must be unique"),
    ({"engine": {"lora": {}}, "model": {"servedName": "base"}, "adapters": [{"name": "base", "source": {"path": "/a"}}]},
     "model.servedName"),
    ({"engine": {"lora": {}}, "adapters": [{"name": "has space", "source": {"path": "/a"}}]}, "adapters.0.name"),
    ({"engine": {"lora": {}}, "adapters": [{"name": "sql", "source": {"path": "relative"}}]}, "adapters.0.source.path"),
    ({"engine": {"lora": {"maxLoras": 8, "maxCpuLoras": 4}}}, "engine.lora.maxCpuLoras"),
    ({"engine": {"tensorParallelSize": 2, "lora": {}}, "resources": {"gpusPerReplica": 2}}, "one GPU per replica only"),
]


@pytest.mark.parametrize(("spec", "field"), BAD_SPECS, ids=[f for _, f in BAD_SPECS])
def test_bad_spec_is_rejected_by_schema_and_models_naming_the_field(spec: dict[str, Any], field: str) -> None:
    assert schema_errors(_service(spec)), f"the CRD schema accepts {spec}"
    with pytest.raises(ValidationError) as caught:
        InferenceServiceSpec.model_validate(spec)
    assert field in format_errors(caught.value)


def test_defaults_of_schema_and_models_agree() -> None:
    from .schema import apply_defaults, crd_schema

    defaulted = apply_defaults(crd_schema(), _service({}))["spec"]
    from_models = InferenceServiceSpec().model_dump(exclude_none=True)
    assert defaulted == from_models


def test_unknown_field_is_an_error_naming_it() -> None:
    bad = copy.deepcopy({"engine": {"tensorParallelSise": 2}})
    with pytest.raises(ValidationError) as caught:
        InferenceServiceSpec.model_validate(bad)
    assert "spec.engine.tensorParallelSise" in format_errors(caught.value)
