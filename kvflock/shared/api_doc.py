"""The OpenAPI document that the worker and the router publish, made to say what they answer:
each operation's real statuses with OpenAI's error body (FastAPI's generated 422 is never sent:
validation errors are 400s), server-sent events beside JSON for generation, text for /metrics,
and, with keys on, the bearer scheme on every operation that needs one (kvflock.shared.auth)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvflock.shared.auth import CLOSED, OPEN_PATHS, AccessPolicy

if TYPE_CHECKING:
    from fastapi import FastAPI

_ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}},
    }},
}
_MEANINGS = {
    400: "invalid request; `param` names the field",
    401: "missing or wrong key",
    403: "closed: keys are on but no admin token is configured",
    404: "the model is not served here",
    413: "request body too large",
    429: "queue or key limit full; retry after Retry-After seconds",
    500: "the worker is broken (failed load or stopped engine loop)",
    503: "loading, draining or no replica ready; retry after Retry-After seconds",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the given statuses, each with the OpenAI error body."""
    return {status: {"description": _MEANINGS[status], "content": {"application/json": {"schema": _ERROR_BODY}}}
            for status in statuses}


# Generation: a JSON answer, or with "stream": true server-sent events; and what may refuse it.
GENERATION = {
    200: {"description": "the answer, or its events when streaming",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {"type": "string"}}}},
    **errors(400, 404, 413, 429, 503),
}
METRICS = {200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}}


def publish(app: FastAPI, access: AccessPolicy) -> None:
    """Make `app.openapi()` the document described above (built once, on first request)."""
    from fastapi.openapi.utils import get_openapi

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in doc.get("paths", {}).items():
                for operation in operations.values():
                    responses = operation["responses"]
                    responses.pop("422", None)
                    if path in OPEN_PATHS:
                        continue
                    keys, _ = access.required(path)
                    if keys is CLOSED:
                        responses.update({"403": errors(403)[403]})
                    elif keys:
                        operation["security"] = [{"bearer": []}]
                        responses.update({"401": errors(401)[401]})
            schemas = doc.get("components", {}).get("schemas", {})
            for generated in ("HTTPValidationError", "ValidationError"):
                schemas.pop(generated, None)
            if access.api_keys or access.admin_tokens:
                doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
