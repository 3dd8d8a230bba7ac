"""A CRD's structural OpenAPI v3 schema applied to a custom object, as kube-apiserver does it.

Three steps, in the API server's order:

- `prune`: fields the schema does not declare are dropped (except under
  ``x-kubernetes-preserve-unknown-fields``) and reported, so that the caller can answer what
  the request's ``fieldValidation`` asks for;
- `apply_defaults`: absent fields with a ``default`` get it, nested defaults included; a
  ``null`` where the schema is not ``nullable`` is replaced by the default or dropped;
- `validate`: types (``x-kubernetes-int-or-string`` too), ``nullable``, ``required``,
  ``enum``, ``minimum``/``maximum`` (and their exclusive forms), ``multipleOf``,
  ``minLength``/``maxLength``, ``pattern``, ``minItems``/``maxItems``, ``maxProperties``,
  ``additionalProperties``, worded like kube-apiserver's messages
  (``spec.replicas in body should be greater than or equal to 0``).

At the root, ``apiVersion``, ``kind`` and ``metadata`` are the server's, never the schema's
business: kube-apiserver never prunes them, whether the schema declares them or not (kopf's
peering CRDs declare only ``status``; with its kind pruned, an object is one that kubectl
cannot read).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

from kvflock.local.fielderrors import ErrorType, FieldError

__all__ = ["apply_defaults", "prune", "validate"]

_PRESERVE = "x-kubernetes-preserve-unknown-fields"
_ROOT_FIELDS = ("apiVersion", "kind", "metadata")  # kept at the root whatever the schema says
_INT_OR_STRING = "x-kubernetes-int-or-string"


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json_type(value: Any) -> str:
    """The OpenAPI type name of a decoded JSON value (``integer`` for whole numbers)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def prune(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Drop the fields of `value` that `schema` does not declare, in place; their paths."""
    dropped: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for name in list(value):
            field = _child(path, name)
            if not path and name in _ROOT_FIELDS:
                continue
            if properties is not None and name in properties:
                dropped += prune(properties[name], value[name], field)
            elif isinstance(extra, dict):
                dropped += prune(extra, value[name], field)
            elif not schema.get(_PRESERVE):
                del value[name]
                dropped.append(field)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            dropped += prune(schema["items"], item, f"{path}[{index}]")
    return dropped


def apply_defaults(schema: dict[str, Any], value: Any) -> None:
    """Fill in the schema's defaults in `value`, in place."""
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if value.get(name, ...) is None and not sub.get("nullable"):
                del value[name]  # a null the schema does not allow: absent, so defaulted below
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for item in value.values():
                apply_defaults(extra, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)


def _type_matches(schema: dict[str, Any], value: Any) -> bool:
    actual = _json_type(value)
    if schema.get(_INT_OR_STRING):
        return actual in ("integer", "string")
    expected = schema.get("type")
    return expected is None or actual == expected or (expected == "number" and actual == "integer")


def _invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, ErrorType.INVALID, value, f"{path} in body {detail}")


def _number_errors(schema: dict[str, Any], value: int | float, path: str) -> Iterator[FieldError]:
    show = json.dumps  # bounds print as JSON numbers (0, 0.5)
    if "minimum" in schema:
        bound = schema["minimum"]
        if schema.get("exclusiveMinimum") and value <= bound:
            yield _invalid(path, value, f"should be greater than {show(bound)}")
        elif value < bound:
            yield _invalid(path, value, f"should be greater than or equal to {show(bound)}")
    if "maximum" in schema:
        bound = schema["maximum"]
        if schema.get("exclusiveMaximum") and value >= bound:
            yield _invalid(path, value, f"should be less than {show(bound)}")
        elif value > bound:
            yield _invalid(path, value, f"should be less than or equal to {show(bound)}")
    if "multipleOf" in schema and (value / schema["multipleOf"]) % 1:
        yield _invalid(path, value, f"should be a multiple of {show(schema['multipleOf'])}")


def _string_errors(schema: dict[str, Any], value: str, path: str) -> Iterator[FieldError]:
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        limit = schema["maxLength"]
        yield FieldError(path, ErrorType.TOO_LONG, value,
                         f"may not be more than {limit} {'byte' if limit == 1 else 'bytes'}")
    if "minLength" in schema and len(value) < schema["minLength"]:
        yield _invalid(path, value, f"should be at least {schema['minLength']} chars long")
    if "pattern" in schema and re.search(schema["pattern"], value) is None:
        yield _invalid(path, value, f"should match '{schema['pattern']}'")


def _array_errors(schema: dict[str, Any], value: list[Any], path: str) -> Iterator[FieldError]:
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        limit = schema["maxItems"]
        yield FieldError(path, ErrorType.TOO_MANY, len(value),
                         f"must have at most {limit} {'item' if limit == 1 else 'items'}")
    if "minItems" in schema and len(value) < schema["minItems"]:
        yield _invalid(path, value, f"should have at least {schema['minItems']} items")
    if isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from validate(schema["items"], item, f"{path}[{index}]")


def _object_errors(schema: dict[str, Any], value: dict[str, Any], path: str) -> Iterator[FieldError]:
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        limit = schema["maxProperties"]
        yield FieldError(path, ErrorType.TOO_MANY, len(value),
                         f"must have at most {limit} {'item' if limit == 1 else 'items'}")
    for name in schema.get("required", []):
        if name not in value:
            yield FieldError(_child(path, name), ErrorType.REQUIRED)
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    for name, item in value.items():
        if not path and name == "metadata":
            continue
        if name in properties:
            yield from validate(properties[name], item, _child(path, name))
        elif isinstance(extra, dict):
            yield from validate(extra, item, _child(path, name))


def validate(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[FieldError]:
    """What in `value` breaks `schema` (after pruning and defaulting)."""
    if value is None and schema.get("nullable"):
        return
    if not _type_matches(schema, value):
        actual = _json_type(value)
        expected = "integer,string" if schema.get(_INT_OR_STRING) else schema["type"]
        yield FieldError(path, ErrorType.TYPE_INVALID, actual,
                         f'{path} in body must be of type {expected}: "{actual}"')
        return
    if "enum" in schema and value not in schema["enum"]:
        yield FieldError(path, ErrorType.NOT_SUPPORTED, value, "supported values: " + ", ".join(
            json.dumps(v if isinstance(v, str) else json.dumps(v)) for v in schema["enum"]))
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield from _number_errors(schema, value, path)
    elif isinstance(value, str):
        yield from _string_errors(schema, value, path)
    elif isinstance(value, list):
        yield from _array_errors(schema, value, path)
    elif isinstance(value, dict):
        yield from _object_errors(schema, value, path)
