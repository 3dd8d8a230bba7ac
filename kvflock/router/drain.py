"""The router's graceful stop: on SIGTERM (a deleted pod) it keeps serving for a drain period,
each answer saying ``Connection: close``, then stops as uvicorn does, finishing what is in flight.

Why: uvicorn, told to stop, closes every idle kept-alive connection at once. A client that sends
its next request on such a connection just then (the Service still hands it this router's
connection) gets no answer and no retry: nothing can tell whether the request was read. While
draining, a client's next request is still served, and its answer closes the connection, so the
client opens a new one, which the Service sends to another router.
"""

from __future__ import annotations

import threading
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DRAIN_SECONDS", "DrainingServer"]

# Longer than the keep-alive expiry of httpx (the openai client's transport) and of uvicorn, 5 s:
# a connection that stayed idle all along has been dropped by its client before the router closes it.
DRAIN_SECONDS = 6.0


class _CloseWhileDraining:
    """ASGI middleware: ``Connection: close`` on every answer once the server drains."""

    def __init__(self, app: ASGIApp, server: DrainingServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.server.draining.is_set():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_closing)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains for `drain_seconds` after SIGTERM or SIGINT; a second signal
    stops it at once."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float = DRAIN_SECONDS) -> None:
        config.app = _CloseWhileDraining(config.app, self)
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.draining = threading.Event()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining.is_set() or self.drain_seconds <= 0:
            super().handle_exit(sig, frame)
            return
        self.draining.set()
        timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()
