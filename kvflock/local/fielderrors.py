"""Field errors as kube-apiserver reports them: one error per field path, worded like
k8s.io/apimachinery's ``field.Error``, and the 422 Invalid Status that carries them.

Schema validation (`kvflock.local.structural`) and CEL rules (`kvflock.local.cel`) both produce
`FieldError`s; `invalid` turns a list of them into the Status that clients such as kubectl
print as ``The InferenceService "x" is invalid: spec.replicas: Invalid value: -1: ...``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

import kmock

__all__ = ["BLOCKING", "ErrorType", "FieldError", "invalid"]


class ErrorType(enum.Enum):
    """A field error's type: (its Status cause reason, the words that start its message)."""

    INVALID = ("FieldValueInvalid", "Invalid value")
    TYPE_INVALID = ("FieldValueTypeInvalid", "Invalid value")
    NOT_SUPPORTED = ("FieldValueNotSupported", "Unsupported value")
    REQUIRED = ("FieldValueRequired", "Required value")
    TOO_LONG = ("FieldValueTooLong", "Too long")
    TOO_MANY = ("FieldValueTooMany", "Too many")

    @property
    def reason(self) -> str:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]


# The types whose errors stop the CEL rules from running, as in kube-apiserver: the rules
# may assume the schema holds (types right, required fields present, sizes bounded).
BLOCKING = frozenset({ErrorType.TYPE_INVALID, ErrorType.NOT_SUPPORTED, ErrorType.REQUIRED,
                      ErrorType.TOO_LONG, ErrorType.TOO_MANY})


def _go_value(value: Any) -> str:
    """A JSON value printed as Go prints it in field errors (strings quoted, 2.0 as 2)."""
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class FieldError:
    """What is wrong at one field path (e.g. ``spec.router.pools[0].name``)."""

    path: str
    type: ErrorType
    value: Any = None
    detail: str = ""

    def body(self) -> str:
        """The message without the path, e.g. ``Invalid value: -1: spec.replicas in body ...``."""
        if self.type in (ErrorType.REQUIRED, ErrorType.TOO_LONG):
            text = self.type.label  # kube-apiserver leaves the value out of these
        else:
            text = f"{self.type.label}: {_go_value(self.value)}"
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.path or '<nil>'}: {self.body()}"


def invalid(kind: str, group: str, name: str, errors: list[FieldError]) -> kmock.KubernetesError:
    """The 422 Invalid Status of an object that failed validation."""
    qualified = f"{kind}.{group}" if group else kind
    listed = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    causes = [{"reason": e.type.reason, "message": e.body(), "field": e.path or "<nil>"} for e in errors]
    return kmock.KubernetesError(
        status=422,
        reason="Invalid",
        message=f'{qualified} "{name}" is invalid: {listed}',
        details={"name": name, "group": group, "kind": kind, "causes": causes},
    )
