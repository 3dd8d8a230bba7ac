"""The engine's speculative section: checked by schema and models alike, passed to the workers
in their engine config file (`kvflock serve --config`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kvflock.operator import children
from kvflock.operator.children import Owner
from kvflock.operator.crd import InferenceServiceSpec, format_errors
from pydantic import ValidationError

from .schema import schema_errors

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")


def _service(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "x"}, "spec": spec}


def _engine_config(engine: dict[str, Any]) -> dict[str, Any]:
    spec = InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}, "engine": engine})
    return json.loads(children.engine_configmap(OWNER, spec)["data"]["engine.json"])


def test_prompt_lookup_settings_go_into_the_engine_config_file() -> None:
    engine = _engine_config({"speculative": {"method": "ngram", "numTokens": 5, "promptLookupMax": 3}})
    assert engine["speculative_method"] == "ngram"
    assert engine["num_speculative_tokens"] == 5
    assert engine["prompt_lookup_min"] == 2
    assert engine["prompt_lookup_max"] == 3
    assert "draft_model" not in engine


def test_draft_model_settings_go_into_the_engine_config_file() -> None:
    engine = _engine_config({"speculative": {"method": "draft", "draftModel": "/models/small"}})
    assert engine["speculative_method"] == "draft"
    assert engine["draft_model"] == "/models/small"


def test_no_speculative_section_means_no_speculation() -> None:
    assert "speculative_method" not in _engine_config({})


@pytest.mark.parametrize(("speculative", "field"), [
    ({"method": "draft"}, "draftModel"),
    ({"method": "ngram", "draftModel": "/models/small"}, "draftModel"),
    ({"method": "ngram", "promptLookupMin": 5, "promptLookupMax": 3}, "promptLookupMin"),
    ({"method": "ngram", "numTokens": 0}, "numTokens"),
    ({"method": "medusa"}, "method"),
    ({"method": "draft", "draftModel": "relative/path"}, "draftModel"),
])
def test_bad_speculative_section_is_rejected_naming_the_field(speculative: dict[str, Any], field: str) -> None:
    spec = {"engine": {"speculative": speculative}}
    assert schema_errors(_service(spec)), f"the CRD schema accepts {spec}"
    with pytest.raises(ValidationError) as caught:
        InferenceServiceSpec.model_validate(spec)
    assert f"speculative.{field}" in format_errors(caught.value)
