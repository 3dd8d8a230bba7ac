"""kvflock.local.validation on schemas our CRD does not exercise: the rest of the structural
schema's keywords, and CEL rules the local API server cannot honour (refused loudly)."""

from __future__ import annotations

from typing import Any

import kmock
import pytest

from kvflock.local.validation import CustomResourceValidator, FieldValidation

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["port"],
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True, "maxLength": 4},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "hosts": {"type": "array", "maxItems": 2, "items": {"type": "string", "pattern": "^[a-z]+$"}},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "weight": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "default": 1},
            },
            "x-kubernetes-validations": [{"rule": "self.weight > 0.5", "message": "weight must exceed 0.5"}],
        },
    },
}


def _admit(spec: dict[str, Any], directive: FieldValidation = FieldValidation.STRICT,
           schema: dict[str, Any] = SCHEMA) -> tuple[dict[str, Any], list[str]]:
    obj = {"metadata": {"name": "x", "annotations": {"a": "b"}}, "spec": spec}
    warnings = CustomResourceValidator("Thing", "example.dev", "v1", schema).admit(obj, directive)
    return obj, warnings


def _errors(spec: dict[str, Any]) -> str:
    with pytest.raises(kmock.KubernetesError) as caught:
        _admit(spec)
    assert caught.value.status == 422 and caught.value.reason == "Invalid"
    return str(caught.value.message)


def test_int_or_string_nullable_maps_and_preserved_fields_are_accepted_and_defaulted() -> None:
    obj, warnings = _admit({"port": "http", "note": None, "labels": {"a": "b"}, "extra": {"any": {"thing": 1}}})
    assert warnings == [] and obj["metadata"]["annotations"] == {"a": "b"}
    assert obj["spec"] == {"port": "http", "note": None, "labels": {"a": "b"}, "extra": {"any": {"thing": 1}},
                           "weight": 1}


def test_each_keyword_names_its_field() -> None:
    message = _errors({"port": 1.5, "note": "toolong", "labels": {"a": 3}, "hosts": ["a", "b", "C"]})
    assert 'spec.port: Invalid value: "number": spec.port in body must be of type integer,string: "number"' in message
    assert "spec.note: Too long: may not be more than 4 bytes" in message
    assert 'spec.labels.a: Invalid value: "integer": spec.labels.a in body must be of type string' in message
    assert "spec.hosts: Too many: 3: must have at most 2 items" in message
    assert "spec.hosts[2]: Invalid value: \"C\": spec.hosts[2] in body should match '^[a-z]+$'" in message


def test_a_missing_required_field_blocks_the_cel_rules_as_kube_apiserver_does() -> None:
    message = _errors({"weight": 0.1})
    assert "spec.port: Required value" in message and "some validation rules were not checked" in message
    assert "weight must exceed" not in message


def test_cel_sees_numbers_as_doubles_and_an_exclusive_minimum_holds() -> None:
    assert 'spec: Invalid value: "object": weight must exceed 0.5' in _errors({"port": 80, "weight": 0.25})
    assert "spec.weight in body should be greater than 0" in _errors({"port": 80, "weight": 0})


def test_unknown_fields_are_refused_warned_or_dropped_as_asked() -> None:
    with pytest.raises(kmock.KubernetesError) as caught:
        _admit({"port": 80, "prot": 1})
    assert caught.value.status == 400 and 'strict decoding error: unknown field "spec.prot"' in str(caught.value.message)
    obj, warnings = _admit({"port": 80, "prot": 1}, FieldValidation.WARN)
    assert warnings == ['unknown field "spec.prot"'] and "prot" not in obj["spec"]
    obj, warnings = _admit({"port": 80, "prot": 1}, FieldValidation.IGNORE)
    assert warnings == [] and "prot" not in obj["spec"]


def test_api_version_and_kind_are_kept_though_the_schema_does_not_declare_them() -> None:
    schema = {"type": "object",
              "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    obj = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "x"},
           "status": {"op-a": {"priority": 3}}}
    validator = CustomResourceValidator("ClusterKopfPeering", "kopf.dev", "v1", schema)
    warnings = validator.admit(obj, FieldValidation.STRICT)
    assert warnings == []
    assert obj == {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "x"},
                   "status": {"op-a": {"priority": 3}}}


def test_a_bad_field_validation_directive_is_a_400() -> None:
    with pytest.raises(kmock.KubernetesError) as caught:
        FieldValidation.of({"fieldValidation": "Loose"})
    assert caught.value.status == 400 and "Loose" in str(caught.value.message)


@pytest.mark.parametrize("rule", [
    {"rule": "self.weight >", "message": "m"},
    {"rule": "self.weight > 0.0", "messageExpression": "'m'"},
    {"rule": "self.weight == oldSelf.weight", "message": "immutable"},
])
def test_a_rule_it_cannot_evaluate_fails_when_the_crd_is_installed(rule: dict[str, str]) -> None:
    schema = {"type": "object", "properties": {"spec": {"type": "object", "x-kubernetes-validations": [rule],
                                                        "properties": {"weight": {"type": "number"}}}}}
    with pytest.raises(ValueError, match="x-kubernetes-validations rule"):
        CustomResourceValidator("Thing", "example.dev", "v1", schema)


def test_a_rule_that_fails_to_run_refuses_the_object() -> None:
    schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {"url": {"type": "string"}},
                                                        "x-kubernetes-validations": [{"rule": "isURL(self.url)"}]}}}
    with pytest.raises(kmock.KubernetesError) as caught:
        _admit({"url": "http://x"}, schema=schema)
    assert "spec: Invalid value: \"object\": rule evaluation error" in str(caught.value.message)
