"""OpenAI-shaped errors: every refusal of the worker's API is one of these, with the field it
names as `param` (400 for bad input, 404, 413, 429 and 503 with Retry-After)."""

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


def error_from_value(exc: ValueError) -> ApiError:
    """Engine errors read 'field: what is wrong'; the field becomes the error's param."""
    message = str(exc)
    head, sep, _ = message.partition(":")
    return ApiError(400, message, param=head if sep and head.isidentifier() else None)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """Pydantic's first error as a 400 naming the field (its path, less FastAPI's "body")."""
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = first.get("msg", "invalid request")
    if param is None and first.get("type") == "value_error":  # a check of the whole body: 'field: ...'
        return error_from_value(ValueError(message.removeprefix("Value error, ")))
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def build_or_400(build: Callable[[], Any]) -> Any:
    """`build()`, its validation errors turned into a 400 naming the field."""
    try:
        return build()
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    except ValueError as exc:
        raise error_from_value(exc) from exc
