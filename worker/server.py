"""The worker's OpenAI-compatible HTTP server (FastAPI).

/v1/completions and /v1/chat/completions (streaming over SSE or not), /v1/models, the
kubelet's /health and /ready, Prometheus /metrics (or on its own port), and /admin/drain for the
operator; `access` (kvflock/shared/auth.py) decides which of them need a key.
Every refusal is an OpenAI-style error body: 400 for bad input (naming the field), 404 for
an unknown model, 413 for an oversized body, 429 with Retry-After when the queue is full,
503 with Retry-After while loading or draining.
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvflock.shared.auth import AccessControl, AccessPolicy
from kvflock.shared.chat import render_chat
from kvflock.worker.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from kvflock.worker.engine import CompletionOutput, RequestOutput
from kvflock.worker.metrics import WorkerMetrics
from kvflock.worker.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
# The longest an engine step may take before /health reports the loop as stuck.
STUCK_AFTER_SECONDS = 120.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _error_from_value(exc: ValueError) -> ApiError:
    """Engine errors read 'field: what is wrong'; the field becomes the error's param."""
    message = str(exc)
    head, sep, _ = message.partition(":")
    return ApiError(400, message, param=head if sep and head.isidentifier() else None)


@dataclass
class WorkerState:
    """What the endpoints share: the engine once loaded, and the drain flag."""

    served_model_name: str
    engine: AsyncEngine | None = None
    load_error: str | None = None
    draining: bool = False
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)

    def set_engine(self, engine: AsyncEngine) -> None:
        self.metrics.watch(engine)
        self.engine = engine

    def serving_engine(self) -> AsyncEngine:
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if self.draining:
            raise ApiError(503, "this worker is draining and takes no new requests", "service_unavailable", headers=retry)
        if self.engine is None:
            raise ApiError(503, "the model is still loading", "service_unavailable", headers=retry)
        return self.engine


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        error = ApiError(413, f"request body exceeds {self.max_bytes} bytes", param="body")
        response = error.response()
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class _BodyTooLarge(Exception):
    pass


def create_app(state: WorkerState, max_request_bytes: int = 1 << 20,
               load: Callable[[], AsyncEngine] | None = None,
               on_load_error: Callable[[], None] | None = None, access: AccessPolicy = AccessPolicy(),
               serve_metrics: bool = True) -> FastAPI:
    """The worker's app. With `load`, the model loads in the background after start-up, so
    that /health answers at once and /ready turns 200 when the engine can serve. Without
    `serve_metrics`, /metrics is left to a separate port (`kvflock serve --metrics-port`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load is not None:
            args = (state, load, on_load_error)
            threading.Thread(target=_load_in_background, args=args, name="kvflock-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="kvflock worker", lifespan=lifespan)
    app.state.worker = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", param="body").response()
        return _validation_error(exc.errors()).response()

    @app.get("/health")
    async def health() -> Response:
        engine = state.engine
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=500)
        if engine is not None and (not engine.is_alive or time.monotonic() - engine.last_step_at > STUCK_AFTER_SECONDS):
            return JSONResponse({"status": "engine loop stopped"}, status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if state.engine is None or state.draining or not state.engine.is_alive:
            reason = "draining" if state.draining else "loading" if state.engine is None else "engine stopped"
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return JSONResponse({"ready": True})

    if serve_metrics:
        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def drain_status() -> dict[str, Any]:
        in_flight = state.engine.num_in_flight if state.engine else 0
        return {"draining": state.draining, "in_flight": in_flight, "drained": state.draining and in_flight == 0}

    @app.post("/admin/drain")
    async def drain() -> dict[str, Any]:
        if not state.draining:
            log.info("draining: no new requests are taken")
        state.draining = True
        return drain_status()

    @app.get("/admin/drain")
    async def drain_progress() -> dict[str, Any]:
        return drain_status()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "kvflock"}
        if state.engine is not None:
            model["max_model_len"] = state.engine.max_model_len
        return {"object": "list", "data": [model]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrived = time.monotonic()
        engine = _prepare(state, body.model)
        params = _params(lambda: body.sampling_params(body.max_tokens, body.logprobs))
        prompts = body.prompts()
        stream = await _start(state, engine, [(p, params) for p in prompts])
        formatter = _CompletionFormat(f"cmpl-{uuid.uuid4().hex}", state.served_model_name, body.n, engine)
        return await _respond(request, stream, formatter, body.stream, body.include_usage, len(prompts), arrived)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrived = time.monotonic()
        engine = _prepare(state, body.model)
        params = _params(lambda: body.sampling_params(body.output_limit, body.num_logprobs))
        prompt = _chat_prompt(engine, body)
        stream = await _start(state, engine, [(prompt, params)])
        formatter = _ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", state.served_model_name, body.n, engine)
        return await _respond(request, stream, formatter, body.stream, body.include_usage, 1, arrived)

    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_middleware(AccessControl, policy=access)  # outermost: no body is read before the key is checked
    return app


def _load_in_background(state: WorkerState, load: Callable[[], AsyncEngine],
                        on_load_error: Callable[[], None] | None) -> None:
    try:
        state.set_engine(load())
    except Exception as exc:  # /health reports it (500), so that the kubelet restarts the pod
        log.error("loading the model failed: %s: %s", type(exc).__name__, exc)
        state.load_error = f"{type(exc).__name__}: {exc}"
        if on_load_error is not None:
            on_load_error()


def _prepare(state: WorkerState, model: str) -> AsyncEngine:
    if model != state.served_model_name:
        raise ApiError(404, f"model: {model!r} is not served here; this worker serves {state.served_model_name!r}",
                       param="model")
    return state.serving_engine()


def _validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """Pydantic's first error as a 400 naming the field (its path, less FastAPI's "body")."""
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = first.get("msg", "invalid request")
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def _params(build: Callable[[], Any]) -> Any:
    try:
        return build()
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from exc
    except ValueError as exc:
        raise _error_from_value(exc) from exc


def _chat_prompt(engine: AsyncEngine, body: ChatCompletionRequest) -> str:
    try:
        return render_chat(engine.tokenizer, [m.as_template_input() for m in body.messages])
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc


# -- running requests -------------------------------------------------------------------


@dataclass
class _Tracked:
    """One engine request's progress, for deltas and latency metrics."""

    prompt_index: int
    arrived: float
    last_token_at: float | None = None
    tokens_seen: dict[int, int] = field(default_factory=dict)
    text_seen: dict[int, int] = field(default_factory=dict)


async def _start(state: WorkerState, engine: AsyncEngine, requests: list[tuple[Any, Any]]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Submit every request and wait until each is accepted and has its first output, so that
    a refusal becomes an HTTP error before any byte of the answer is sent."""
    base = uuid.uuid4().hex
    generators = [engine.generate(f"{base}-{i}", prompt, params) for i, (prompt, params) in enumerate(requests)]
    firsts: list[RequestOutput] = []
    try:
        for gen in generators:
            firsts.append(await gen.__anext__())
    except BaseException as exc:
        for gen in generators:
            await gen.aclose()
        if isinstance(exc, ValueError):
            raise _error_from_value(exc) from exc
        if isinstance(exc, EngineOverloaded):
            raise ApiError(429, f"the server is overloaded ({exc}); retry later", "rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from exc
        if isinstance(exc, EngineDead):
            raise ApiError(503, str(exc), "service_unavailable") from exc
        raise
    for out in firsts:
        state.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
    return _merge(generators, firsts)


async def _merge(generators: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the prompt's index."""
    for i, out in enumerate(firsts):
        yield i, out
    pending = {i for i, out in enumerate(firsts) if not out.finished}
    if len(pending) == 1:
        [i] = pending
        async for out in generators[i]:
            yield i, out
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in generators[i]:
                await merged.put((i, out))
        except Exception as exc:
            await merged.put((i, exc))
        await merged.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in pending]
    try:
        while pending:
            i, item = await merged.get()
            if item is None:
                pending.discard(i)
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for gen in generators:
            await gen.aclose()


class _Format:
    """Turns engine outputs into OpenAI response objects; subclasses pick the flavour."""

    object_full: str
    object_chunk: str

    def __init__(self, response_id: str, model: str, n: int, engine: AsyncEngine) -> None:
        self.id, self.model, self.n, self.engine = response_id, model, n, engine
        self.created = int(time.time())

    def choice_index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    def token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

    def envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_chunk if chunk else self.object_full,
                "created": self.created, "model": self.model, "choices": choices}

    def full_choice(self, index: int, completion: CompletionOutput) -> dict[str, Any]:
        raise NotImplementedError

    def delta_choice(self, index: int, completion: CompletionOutput, text: str, first: bool,
                     token_range: tuple[int, int]) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionFormat(_Format):
    object_full = object_chunk = "text_completion"

    def logprobs(self, completion: CompletionOutput, start: int, end: int, text_offset: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        entries = completion.logprobs[start:end]
        tokens = [self.token_text(e.token_id) for e in entries]
        offsets, at = [], text_offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top.items()} for e in entries],
                "text_offset": offsets}

    def full_choice(self, index: int, completion: CompletionOutput) -> dict[str, Any]:
        return {"index": index, "text": completion.text, "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, 0, len(completion.token_ids), 0)}

    def delta_choice(self, index, completion, text, first, token_range):
        text_offset = len(completion.text) - len(text)
        return {"index": index, "text": text, "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, *token_range, text_offset)}


class _ChatFormat(_Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def logprobs(self, completion: CompletionOutput, start: int, end: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [
            {**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top.items()]}
            for e in completion.logprobs[start:end]
        ]}

    def full_choice(self, index: int, completion: CompletionOutput) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, 0, len(completion.token_ids))}

    def delta_choice(self, index, completion, text, first, token_range):
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, *token_range)}


def _observe(state: WorkerState, tracked: _Tracked, out: RequestOutput, now: float) -> None:
    new_tokens = sum(len(c.token_ids) - tracked.tokens_seen.get(c.index, 0) for c in out.outputs)
    if new_tokens > 0:
        if tracked.last_token_at is None:
            state.metrics.ttft.observe(now - tracked.arrived)
        else:
            for _ in range(new_tokens):
                state.metrics.itl.observe((now - tracked.last_token_at) / new_tokens)
        tracked.last_token_at = now
        state.metrics.generation_tokens.inc(new_tokens)
    if out.finished:
        state.metrics.e2e.observe(now - tracked.arrived)
        for c in out.outputs:
            state.metrics.requests.labels(finish_reason=c.finish_reason or "unknown").inc()


async def _respond(request: Request, stream: AsyncIterator[tuple[int, RequestOutput]], fmt: _Format,
                   streaming: bool, include_usage: bool, num_prompts: int, arrived: float) -> Response:
    state: WorkerState = request.app.state.worker
    tracked = {i: _Tracked(i, arrived) for i in range(num_prompts)}

    if streaming:
        return StreamingResponse(_sse(state, stream, fmt, tracked, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    finals: dict[int, RequestOutput] = {}
    collector = asyncio.ensure_future(_collect(state, stream, tracked, finals))
    while not collector.done():
        await asyncio.wait([collector], timeout=0.5)
        if not collector.done() and await request.is_disconnected():
            collector.cancel()  # closing the stream aborts the requests and frees their blocks
            await asyncio.gather(collector, return_exceptions=True)
            return Response(status_code=499)
    collector.result()
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i in range(num_prompts):
        out = finals[i]
        prompt_tokens += len(out.prompt_token_ids)
        for c in out.outputs:
            if c.finish_reason == "error":
                raise ApiError(500, "the request failed inside the engine; see the worker's log", "internal_error")
            completion_tokens += len(c.token_ids)
            choices.append(fmt.full_choice(fmt.choice_index(i, c), c))
    body = fmt.envelope(False, sorted(choices, key=lambda c: c["index"]))
    body["usage"] = _usage(prompt_tokens, completion_tokens)
    return JSONResponse(body)


async def _collect(state: WorkerState, stream: AsyncIterator[tuple[int, RequestOutput]],
                   tracked: dict[int, _Tracked], finals: dict[int, RequestOutput]) -> None:
    try:
        async for i, out in stream:
            _observe(state, tracked[i], out, time.monotonic())
            tracked[i].tokens_seen = {c.index: len(c.token_ids) for c in out.outputs}
            finals[i] = out
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(state: WorkerState, stream: AsyncIterator[tuple[int, RequestOutput]], fmt: _Format,
               tracked: dict[int, _Tracked], include_usage: bool) -> AsyncIterator[str]:
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[tuple[int, int], int] = {}
    try:
        async for i, out in stream:
            _observe(state, tracked[i], out, time.monotonic())
            prompt_tokens[i] = len(out.prompt_token_ids)
            choices = []
            for c in out.outputs:
                t = tracked[i]
                seen_tokens, seen_text = t.tokens_seen.get(c.index, 0), t.text_seen.get(c.index, 0)
                if len(c.token_ids) == seen_tokens and c.finish_reason is None:
                    continue
                if c.finish_reason == "error":
                    error = {"message": "the request failed inside the engine", "type": "internal_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    continue
                first = c.index not in t.tokens_seen
                choices.append(fmt.delta_choice(fmt.choice_index(i, c), c, c.text[seen_text:], first,
                                                (seen_tokens, len(c.token_ids))))
                t.tokens_seen[c.index], t.text_seen[c.index] = len(c.token_ids), len(c.text)
                completion_tokens[(i, c.index)] = len(c.token_ids)
            if choices:
                yield f"data: {json.dumps(fmt.envelope(True, choices))}\n\n"
        if include_usage:
            usage_chunk = fmt.envelope(True, [])
            usage_chunk["usage"] = _usage(sum(prompt_tokens.values()), sum(completion_tokens.values()))
            yield f"data: {json.dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
