"""Forwarding a request to the chosen replica, and to another one while nothing has reached
the client yet.

A replica that refuses the connection, answers 503 (loading, draining, engine stopped) or 429
(queue full), or closes the connection before the first byte of its answer is marked at once,
so that concurrent requests skip it too, and the request goes to the next choice. The router
holds back the replica's status line until the first body byte has arrived, so a replica that
dies before answering costs a retry, not an error. Once a byte has been relayed, a retry would
duplicate output: a stream of one choice is then continued on another replica from the tokens
the client has (kvflock.router.resume), relayed one whole SSE event at a time; any other answer
is relayed byte for byte, and a failure after its first byte cuts the client's connection. With
an internal token, the client's Authorization header is replaced by the router's own, so user
keys never reach the workers.

While no replica of the request's pool is ready but one is starting, a request is held for up
to `hold_seconds` instead of refused; with `scale_from_zero`, also while there is no replica at
all: the autoscaler sees the held count in the router's metrics and adds one. The request goes on
once a replica is ready, or gets 503. When nothing is coming (no replica, or every one
crash-looping or failed) it gets 503 at once, and so does a held request the moment that happens:
waiting would only delay the same answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvflock.router.fleet import Fleet, Replica
from kvflock.router.metrics import RouterMetrics
from kvflock.router.policy import Refusal, RequestFeatures, Router, pool_members
from kvflock.router.resume import StreamLedger, continuable
from kvflock.shared.auth import bearer_header
from kvflock.shared.stream_seam import TOKENS_HEADER

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3
# A replica that answered 429 is skipped for its Retry-After, at most this long.
MAX_SATURATION_SECONDS = 1.0
# How often a request waiting for its replica's first byte checks whether the client left.
_DISCONNECT_CHECK_SECONDS = 0.5
# How often a held request looks for a replica that can take it.
_HOLD_CHECK_SECONDS = 0.1

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "transfer-encoding", "upgrade", "host", "content-length"})


def error_response(status: int, message: str, type_: str, retry_after: int | None = None,
                   param: str | None = None) -> JSONResponse:
    """An OpenAI-style error body, as the workers write them."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


class _StreamCut(Exception):
    """No replica could continue a stream: the client's connection is cut, as the worker's was."""


class _Retry(Exception):
    """The replica did not take the request; another one may."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass
class _Upstream:
    response: httpx.Response
    first: bytes
    rest: AsyncIterator[bytes]


class _RelayResponse(StreamingResponse):
    """A streamed answer whose clean-up runs however the response ends, even when the client
    leaves before the first chunk (where a generator's `finally` would never run)."""

    def __init__(self, body: AsyncIterator[bytes], status_code: int, headers: Mapping[str, str],
                 on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, status_code=status_code, headers=dict(headers))
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class Proxy:
    def __init__(self, fleet: Fleet, router: Router, metrics: RouterMetrics, client: httpx.AsyncClient,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, clock: Callable[[], float] = time.monotonic,
                 internal_token: bytes | None = None, hold_seconds: float = 0.0, scale_from_zero: bool = False) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {max_attempts}")
        if hold_seconds < 0:
            raise ValueError(f"hold_seconds: must be >= 0, got {hold_seconds}")
        self.fleet, self.router, self.metrics, self.client = fleet, router, metrics, client
        self.max_attempts, self.clock, self.hold_seconds = max_attempts, clock, hold_seconds
        self.scale_from_zero = scale_from_zero
        self._upstream_auth = bearer_header(internal_token) if internal_token is not None else None

    async def forward(self, request: Request, path: str, body: bytes, features: RequestFeatures,
                      parsed: dict[str, Any] | None = None) -> Response:
        """Send the request to the best replica, retrying on others before the first byte. With
        `parsed` (the body read), a stream of one choice is continued on another replica when
        its replica fails after the first byte."""
        arrived = self.clock()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        if self._upstream_auth is not None:
            headers["authorization"] = self._upstream_auth
        if self.hold_seconds > 0 and not self._can_serve(features):
            nothing_coming = self._nothing_coming(features)
            if nothing_coming is None:
                waited = await self._hold(request, features)
                if waited is None:  # the client left while held
                    return Response(status_code=499)
                nothing_coming = self._nothing_coming(features)
                if not waited and nothing_coming is None:
                    self.metrics.hold_timeouts.inc()
                    return self._refuse(503, f"no replica became ready within {self.hold_seconds:g} s")
            if nothing_coming is not None:
                return self._refuse(503, nothing_coming)
        ledger = StreamLedger(parsed) if parsed is not None and continuable(path, parsed) else None
        headers.pop(TOKENS_HEADER, None)  # the router's to set, so that the token ids never reach a client
        if ledger is not None:
            headers[TOKENS_HEADER] = "1"
        tried: set[str] = set()
        opened = await self._attempt(request, features, request.method, path, body, headers, tried)
        if not isinstance(opened, tuple):
            return opened
        replica, upstream = opened
        if ledger is not None:
            return self._relay_continuable(replica, upstream, features, arrived, ledger, path, headers)
        return self._relay(replica, upstream, features.prompt_tokens, arrived)

    async def _attempt(self, request: Request | None, features: RequestFeatures, method: str, path: str, body: bytes,
                       headers: dict[str, str], tried: set[str]) -> tuple[Replica, _Upstream] | Response:
        """The first replica, of up to `max_attempts` not in `tried`, that answers; or the refusal.
        With `request`, gives up (499) once its client has left."""
        saw_full_queue = False
        for _ in range(self.max_attempts):
            choice = self.router.choose(features, self.fleet.views(self.clock()), frozenset(tried))
            if isinstance(choice, Refusal):
                if saw_full_queue:
                    break
                return self._refuse(choice.status, choice.message)
            self.metrics.decided(choice, features)
            replica = self.fleet.get(choice.replica)
            assert replica is not None, "a decision names only replicas of the snapshot it was given"
            tried.add(replica.id)
            replica.begin(features.prompt_tokens)
            opening = self._open(replica, method, path, body, headers)
            try:
                upstream = await (opening if request is None else self._until_client_leaves(request, opening))
            except _Retry as retry:
                replica.end(features.prompt_tokens)
                self.metrics.retries.labels(replica=replica.id, reason=retry.reason).inc()
                saw_full_queue = saw_full_queue or retry.status == 429
                log.info("replica %s did not take a request (%s); trying another", replica.id, retry.reason)
                continue
            except BaseException:
                replica.end(features.prompt_tokens)
                raise
            if upstream is None:  # the client left while the replica worked; the request is dropped
                replica.end(features.prompt_tokens)
                return Response(status_code=499)
            return replica, upstream
        if saw_full_queue:
            return self._refuse(429, "every replica tried has a full queue; retry later")
        return self._refuse(503, f"no replica answered after {self.max_attempts} attempts")

    def _can_serve(self, features: RequestFeatures) -> bool:
        """Whether some replica of the request's pool is ready and not draining."""
        _, members = pool_members(self.router.pools, features.prompt_tokens, self.fleet.views(self.clock()))
        return any(r.serving for r in members)

    def _nothing_coming(self, features: RequestFeatures) -> str | None:
        """Why no replica of the request's pool can become ready, or None while one may."""
        _, members = pool_members(self.router.pools, features.prompt_tokens, self.fleet.views(self.clock()))
        if not members:
            return None if self.scale_from_zero else "no replica can become ready: there is no worker"
        if any(r.may_serve for r in members):
            return None
        return (f"no replica can become ready: every worker ({len(members)}) is crash-looping, failed or"
                " going away")

    async def _hold(self, request: Request, features: RequestFeatures) -> bool | None:
        """Wait until a replica can take the request: True once one can, False when the hold
        timeout passed first or nothing is coming any more, None when the client left."""
        deadline = self.clock() + self.hold_seconds
        self.metrics.held.inc()
        try:
            while not self._can_serve(features):
                if self.clock() >= deadline or self._nothing_coming(features) is not None:
                    return False
                if await request.is_disconnected():
                    return None
                await asyncio.sleep(_HOLD_CHECK_SECONDS)
            return True
        finally:
            self.metrics.held.dec()

    def _refuse(self, status: int, message: str) -> JSONResponse:
        self.metrics.refused.labels(status=str(status)).inc()
        if status == 429:
            return error_response(429, message, "rate_limit_error", self.fleet.retry_after(self.clock()))
        return error_response(503, message, "service_unavailable", 1)

    async def _until_client_leaves(self, request: Request, opening: Awaitable[_Upstream]) -> _Upstream | None:
        """`opening`'s result, or None (with `opening` cancelled) once the client has disconnected,
        so that the replica aborts work nobody will read."""
        task = asyncio.ensure_future(opening)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=_DISCONNECT_CHECK_SECONDS)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return None
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise

    async def _open(self, replica: Replica, method: str, path: str, body: bytes, headers: dict[str, str]) -> _Upstream:
        """Send the request and wait for the first byte of the answer, or raise `_Retry`."""
        outgoing = self.client.build_request(method, f"{replica.url}{path}", content=body, headers=headers)
        try:
            response = await self.client.send(outgoing, stream=True)
        except httpx.ConnectError as exc:
            replica.mark_unreachable()
            raise _Retry("connect_error", 503) from exc
        except httpx.TransportError as exc:  # accepted the connection, closed it without an answer
            replica.mark_unreachable()
            raise _Retry("disconnected", 503) from exc
        try:
            if response.status_code == 503:
                replica.mark_unavailable()
                raise _Retry("unavailable", 503)
            if response.status_code == 429:
                replica.mark_saturated(self.clock() + _retry_after(response))
                raise _Retry("queue_full", 429)
            rest = response.aiter_raw()
            try:
                first = await anext(rest)
            except StopAsyncIteration:
                first = b""
            except httpx.TransportError as exc:
                replica.mark_unreachable()
                raise _Retry("disconnected", 503) from exc
            return _Upstream(response, first, rest)
        except BaseException:
            await response.aclose()
            raise

    def _relay(self, replica: Replica, upstream: _Upstream, prompt_tokens: int, arrived: float) -> Response:
        response = upstream.response
        self.metrics.requests.labels(replica=replica.id, status=str(response.status_code)).inc()
        self.metrics.ttfb.observe(self.clock() - arrived)
        headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP - {"content-length"}}
        headers["x-kvflock-replica"] = replica.id

        async def body() -> AsyncIterator[bytes]:
            if upstream.first:
                yield upstream.first
            try:
                async for chunk in upstream.rest:
                    yield chunk
            except httpx.TransportError:
                self.metrics.broken_streams.inc()
                log.warning("replica %s failed after the first byte; the client's answer is cut off", replica.id)
                raise

        async def close() -> None:
            await response.aclose()
            replica.end(prompt_tokens)

        return _RelayResponse(body(), response.status_code, headers, close)

    def _relay_continuable(self, replica: Replica, upstream: _Upstream, features: RequestFeatures, arrived: float,
                           ledger: StreamLedger, path: str, headers: dict[str, str]) -> Response:
        """Relay a stream of one choice; when its replica fails (or ends it early), continue it on
        another from what the client has received, up to `max_attempts` times."""
        response = upstream.response
        if response.status_code != 200:  # an error body: nothing to continue
            return self._relay(replica, upstream, features.prompt_tokens, arrived)
        self.metrics.requests.labels(replica=replica.id, status="200").inc()
        self.metrics.ttfb.observe(self.clock() - arrived)
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
        out_headers["x-kvflock-replica"] = replica.id
        current: tuple[Replica, _Upstream] | None = (replica, upstream)
        failed: set[str] = set()

        async def body() -> AsyncIterator[bytes]:
            nonlocal current
            resumes = 0
            while True:
                assert current is not None
                serving, open_upstream = current
                try:
                    out = ledger.relay(open_upstream.first)
                    if out:
                        yield out
                    async for chunk in open_upstream.rest:
                        out = ledger.relay(chunk)
                        if out:
                            yield out
                    why = "ended the stream early"
                except httpx.TransportError:
                    serving.mark_unreachable()
                    why = "failed"
                finally:
                    await open_upstream.response.aclose()
                    serving.end(features.prompt_tokens)
                    current = None
                if ledger.done:
                    return
                if ledger.finish_reason is not None:
                    yield ledger.ending()
                    return
                failed.add(serving.id)
                if ledger.failed or resumes == self.max_attempts:
                    break
                resumes += 1
                log.info("replica %s %s after %d tokens; continuing the stream elsewhere", serving.id, why,
                         len(ledger.token_ids))
                continuation = json.dumps(ledger.continuation()).encode()
                opened = await self._attempt(None, features, "POST", path, continuation, headers, set(failed))
                if not isinstance(opened, tuple) or opened[1].response.status_code != 200:
                    if isinstance(opened, tuple):
                        await opened[1].response.aclose()
                        opened[0].end(features.prompt_tokens)
                    break
                current = opened
                ledger.restart()
                self.metrics.resumed_streams.inc()
            self.metrics.broken_streams.inc()
            log.warning("a stream could not be continued on another replica; the client's answer is cut off")
            raise _StreamCut()

        async def close() -> None:
            if current is not None:
                await current[1].response.aclose()
                current[0].end(features.prompt_tokens)

        return _RelayResponse(body(), 200, out_headers, close)


def _retry_after(response: httpx.Response) -> float:
    try:
        seconds = float(response.headers.get("retry-after", MAX_SATURATION_SECONDS))
    except ValueError:
        seconds = MAX_SATURATION_SECONDS
    return min(max(seconds, 0.0), MAX_SATURATION_SECONDS)
