"""The engine's `quantization` setting: an enum in the CRD and the models, passed to the
workers in their engine config file (`kvflock serve --config`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kvflock.operator import children
from kvflock.operator.children import Owner
from kvflock.operator.crd import InferenceServiceSpec
from pydantic import ValidationError

from .schema import schema_errors

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")


def _engine_config(engine: dict[str, Any]) -> dict[str, Any]:
    spec = InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}, "engine": engine})
    return json.loads(children.engine_configmap(OWNER, spec)["data"]["engine.json"])


@pytest.mark.parametrize("quantization", ["gptq", "awq", "int8", "int4", "fp8"])
def test_quantization_goes_into_the_engine_config_file(quantization: str) -> None:
    assert _engine_config({"quantization": quantization})["quantization"] == quantization


def test_without_quantization_the_checkpoint_decides() -> None:
    assert "quantization" not in _engine_config({})


def test_an_unknown_quantization_is_refused_by_schema_and_model() -> None:
    service = {"apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "x"},
               "spec": {"engine": {"quantization": "nf4"}}}
    assert any("quantization" in e for e in schema_errors(service))
    with pytest.raises(ValidationError, match="quantization"):
        InferenceServiceSpec.model_validate({"engine": {"quantization": "nf4"}})
