"""What kube-apiserver does to a custom object before it stores it, in its order: prune the
fields the CRD's schema does not declare (answering the request's ``fieldValidation``), apply
the schema's defaults, validate against the schema, then run the CEL rules.

``fieldValidation`` (a query parameter of creates, updates and patches; kubectl sends
``Strict`` unless told otherwise) decides what an unknown field does:

- ``Strict``: the request fails, naming the fields. As in kube-apiserver, a create or an update
  with such a body is a 400 (``... cannot be handled as a InferenceService: strict decoding
  error: unknown field "spec.replicass"``), a patch a 422 Invalid on the field ``patch``;
- ``Warn`` (the default when the parameter is absent): the fields are dropped and each is named
  in a ``Warning`` response header, which kubectl prints;
- ``Ignore``: the fields are dropped silently.

Schema and CEL failures are a 422 Invalid Status listing every failing field
(`kvflock.local.fielderrors`). CEL rules run only when the schema holds (no type, enum,
required or size error), as in kube-apiserver.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any

import kmock

from kvflock.local import cel, structural
from kvflock.local.fielderrors import BLOCKING, ErrorType, FieldError, invalid

__all__ = ["CustomResourceValidator", "FieldValidation"]

# kube-apiserver adds this error when a schema error kept the CEL rules from running.
_RULES_SKIPPED = FieldError("", ErrorType.INVALID, None, "some validation rules were not checked because the object"
                            " was invalid; correct the existing errors to complete validation")


class FieldValidation(enum.Enum):
    """The ``fieldValidation`` directive of a write request."""

    STRICT = "Strict"
    WARN = "Warn"
    IGNORE = "Ignore"

    @classmethod
    def of(cls, params: Mapping[str, str]) -> FieldValidation:
        """The directive of a request's query parameters (Warn when absent)."""
        value = params.get("fieldValidation") or cls.WARN.value
        try:
            return cls(value)
        except ValueError:
            raise kmock.KubernetesError(
                status=400, reason="BadRequest",
                message=f"fieldValidation must be one of Strict, Warn or Ignore, not {value!r}",
            ) from None


class CustomResourceValidator:
    """Admission of the objects of one custom resource version, by its CRD's schema."""

    def __init__(self, kind: str, group: str, version: str, schema: dict[str, Any]) -> None:
        self.kind, self.group, self.version = kind, group, version
        self._schema = schema
        self._rules = cel.Rules(schema)  # raises ValueError for a rule it cannot evaluate

    def admit(self, obj: dict[str, Any], directive: FieldValidation, *, old: dict[str, Any] | None = None,
              patch: Any = None) -> list[str]:
        """Prune, default and validate `obj` in place; the warnings to send back.

        `old` is the stored object on an update, `patch` the request's patch on a patch; a
        refused object raises the `kmock.KubernetesError` to answer with.
        """
        unknown = structural.prune(self._schema, obj)
        warnings: list[str] = []
        if unknown and directive is FieldValidation.STRICT:
            raise self._strict_error(obj, unknown, patch)
        if unknown and directive is FieldValidation.WARN:
            warnings = [f'unknown field "{field}"' for field in unknown]
        structural.apply_defaults(self._schema, obj)
        errors = list(structural.validate(self._schema, obj))
        if any(error.type in BLOCKING for error in errors):
            errors.append(_RULES_SKIPPED)
        else:
            errors += self._rules.errors(obj, old)
        if errors:
            raise invalid(self.kind, self.group, self._name(obj), errors)
        return warnings

    @staticmethod
    def _name(obj: Mapping[str, Any]) -> str:
        return str((obj.get("metadata") or {}).get("name", ""))

    def _strict_error(self, obj: dict[str, Any], unknown: list[str], patch: Any) -> kmock.KubernetesError:
        detail = "strict decoding error: " + ", ".join(f'unknown field "{field}"' for field in unknown)
        if patch is None:
            return kmock.KubernetesError(
                status=400, reason="BadRequest",
                message=f'{self.kind} in version "{self.version}" cannot be handled as a {self.kind}: {detail}',
            )
        error = FieldError("patch", ErrorType.INVALID, json.dumps(patch, separators=(",", ":")), detail)
        return invalid(self.kind, self.group, self._name(obj), [error])
