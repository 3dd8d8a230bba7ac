"""How every kvflock process logs: text for people (the default) or JSON lines for a log
pipeline, one schema for the worker, the router, the operator and the local cluster, and the
request id that ties one request's lines together across the router and its worker.

A JSON line has `ts` (UTC, ISO 8601), `level`, `logger` and `msg`, then `request_id` while a
request is being served, the fields a call passed with ``extra=``, and `exc` for a traceback.
`RequestIdMiddleware` takes the client's X-Request-Id (or makes one), makes it visible to the
app (the router forwards it to the worker, which keeps it) and to every log line written
while the request is served, and returns it on the response.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # types only: the operator and the CLI import this module without starlette
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept as it is when it is this short; a longer one is replaced (log lines stay small).
MAX_REQUEST_ID_LENGTH = 128

request_id: ContextVar[str | None] = ContextVar("kvflock_request_id", default=None)

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then request_id and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            line["request_id"] = current
        for key, value in _extra_fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, with `[request_id=...]` while a request is served."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        current = request_id.get()
        return f"{text} [request_id={current}]" if current is not None else text


def setup_logging(level: str, log_format: LogFormat, stream: IO[str] = sys.stderr) -> None:
    """Route every logger (uvicorn's and kopf's too: they propagate to the root) through one handler."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # left from an earlier uvicorn config, if any
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def _valid(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isprintable() and value.isascii()


class RequestIdMiddleware:
    """Gives each API request an id: the client's X-Request-Id when it sends a usable one, else
    a new one. The app sees it in its headers (so the router forwards it) and in `request_id`;
    the response carries it back; one log line per request (at `logger`) records how it ended.
    Only paths under `prefix` count as requests: probes and metrics scrapes are not logged."""

    def __init__(self, app: ASGIApp, logger: str, prefix: str = "/v1/") -> None:
        self.app = app
        self.log = logging.getLogger(logger)
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.encode()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == header), "")
        rid = given if _valid(given) else uuid.uuid4().hex
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != header]
                 + [(header, rid.encode())]}
        status = 0
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != header]
                message = {**message, "headers": [*headers, (header, rid.encode())]}
            await send(message)

        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.log.info("%s %s %d", scope["method"], scope["path"], status,
                          extra={"method": scope["method"], "path": scope["path"], "status": status,
                                 "duration_ms": round((time.monotonic() - started) * 1000, 1)})
            request_id.reset(token)
