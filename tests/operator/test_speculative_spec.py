"""The engine's speculative section: checked by schema and models alike, passed to the workers
as `kvflock serve` flags."""

from __future__ import annotations

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


def _command(engine: dict[str, Any]) -> list[str]:
    spec = InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}, "engine": engine})
    return children.worker_template(OWNER, spec)["containers"][0]["command"]


def test_prompt_lookup_settings_become_serve_flags() -> None:
    command = _command({"speculative": {"method": "ngram", "numTokens": 5, "promptLookupMax": 3}})
    assert command[command.index("--speculative-method") + 1] == "ngram"
    assert command[command.index("--num-speculative-tokens") + 1] == "5"
    assert command[command.index("--prompt-lookup-min") + 1] == "2"
    assert command[command.index("--prompt-lookup-max") + 1] == "3"
    assert "--draft-model" not in command


def test_draft_model_settings_become_serve_flags() -> None:
    command = _command({"speculative": {"method": "draft", "draftModel": "/models/small"}})
    assert command[command.index("--speculative-method") + 1] == "draft"
    assert command[command.index("--draft-model") + 1] == "/models/small"


def test_no_speculative_section_means_no_speculation() -> None:
    assert "--speculative-method" not in _command({})


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
