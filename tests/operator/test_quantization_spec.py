"""The engine's `quantization` setting: an enum in the CRD and the models, passed to the
workers as `kvflock serve --quantization`."""

from __future__ import annotations

from typing import Any

import pytest
from kvflock.operator import children
from kvflock.operator.children import Owner
from kvflock.operator.crd import InferenceServiceSpec
from pydantic import ValidationError

from .schema import schema_errors

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")


def _command(engine: dict[str, Any]) -> list[str]:
    spec = InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}, "engine": engine})
    return children.worker_template(OWNER, spec)["containers"][0]["command"]


@pytest.mark.parametrize("quantization", ["gptq", "int8", "int4"])
def test_quantization_becomes_a_serve_flag(quantization: str) -> None:
    command = _command({"quantization": quantization})
    assert command[command.index("--quantization") + 1] == quantization


def test_without_quantization_the_checkpoint_decides() -> None:
    assert "--quantization" not in _command({})


def test_an_unknown_quantization_is_refused_by_schema_and_model() -> None:
    service = {"apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "x"},
               "spec": {"engine": {"quantization": "awq"}}}
    assert any("quantization" in e for e in schema_errors(service))
    with pytest.raises(ValidationError, match="quantization"):
        InferenceServiceSpec.model_validate({"engine": {"quantization": "awq"}})
