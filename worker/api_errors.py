"""OpenAI-shaped errors: every refusal of the worker's API is one of these, with the field it
names as `param` (400 for bad input, 404, 413, 429 and 503 with Retry-After)."""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class FieldError(ValueError):
    """A validation failure that knows which field it is about, wherever it was raised."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param


def error_from_value(exc: ValueError) -> ApiError:
    """Engine errors read 'field: what is wrong'; the field becomes the error's param."""
    message = str(exc)
    head, sep, _ = message.partition(":")
    is_field = bool(sep) and all(part.isidentifier() for part in head.split("."))  # e.g. stream_options.include_usage
    return ApiError(400, message, param=head if is_field else None)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """Pydantic's most specific error as a 400 naming the field, or the FieldError's own field.
    Of a union's branches, the one that got deepest into the value says best what was wrong."""
    first = max(errors, key=lambda e: len(_field_path(e.get("loc", ()))))
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return ApiError(400, str(cause), param=cause.param)
    param = ".".join(_field_path(first.get("loc", ()))) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if param is None and first.get("type") == "value_error":  # a check of the whole body: 'field: ...'
        return error_from_value(ValueError(message))
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


# The names pydantic gives a union's branches in an error's location; the API's fields are snake_case.
_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _field_path(loc: Sequence[Any]) -> list[str]:
    """An error location as the request's field path: less FastAPI's "body" and union branch names
    (`list[int]`, `TextPart`)."""
    return [str(p) for p in loc if isinstance(p, int) or
            (re.fullmatch(r"[a-z_][a-z0-9_]*", str(p)) and p not in _BRANCH_NAMES and p != "body")]


def build_or_400(build: Callable[[], Any]) -> Any:
    """`build()`, its validation errors turned into a 400 naming the field."""
    try:
        return build()
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    except ValueError as exc:
        raise error_from_value(exc) from exc
