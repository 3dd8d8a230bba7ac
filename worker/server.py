"""The worker's OpenAI-compatible HTTP server (FastAPI).

/v1/completions and /v1/chat/completions (streaming over SSE or not; chat with tool calls),
/v1/models (every name the model is served under, and its LoRA adapters with the base as their
"parent"), vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (admin token when keys are on),
vLLM's /tokenize, /detokenize and /version, the
kubelet's /health and /ready, Prometheus /metrics (or on its own port), and /admin/drain for the
operator; `access` (kvflock/shared/auth.py) decides which of them need a key.
Every refusal is an OpenAI-style error body (kvflock.worker.api_errors): 400 for bad input
(naming the field), 404 for an unknown model, 413 for an oversized body, 429 with Retry-After
when the queue is full, 503 with Retry-After while loading or draining. This module holds the
routes; kvflock.worker.responses runs a request's prompts and answers, whole or streamed, in
the shapes of kvflock.worker.openai_format.
"""

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvflock.shared import api_doc
from kvflock.shared.auth import AccessControl, AccessPolicy
from kvflock.shared.chat import render_chat
from kvflock.shared.logs import RequestIdMiddleware
from kvflock.shared.stream_seam import TOKENS_HEADER
from kvflock.shared.version import __version__
from kvflock.worker.api_errors import (
    RETRY_AFTER_SECONDS,
    ApiError,
    build_or_400,
    error_from_value,
    validation_error,
)
from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import SamplingParams, StructuredOutput
from kvflock.worker.metrics import WorkerMetrics
from kvflock.worker.lora.api import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from kvflock.worker.openai_format import ChatFormat, CompletionFormat
from kvflock.worker.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from kvflock.worker.responses import Seam, respond, start_requests
from kvflock.worker.structured_output import Grammar
from kvflock.worker.tool_parsers import ToolCallFormat, ToolCallReader, detect_format

log = logging.getLogger(__name__)

# The longest an engine step may take before /health reports the loop as stuck.
STUCK_AFTER_SECONDS = 120.0




@dataclass
class WorkerState:
    """What the endpoints share: the names the model is served under (the first is its own, the
    others aliases clients may ask for too), the engine once loaded, how tool calls are read, and
    the drain flag."""

    served_model_name: str
    aliases: tuple[str, ...] = ()
    tool_call_parser: str = "auto"  # EngineConfig.tool_call_parser
    engine: AsyncEngine | None = None
    tool_format: ToolCallFormat = "hermes"
    load_error: str | None = None
    draining: bool = False
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.served_model_name, *self.aliases)

    def set_engine(self, engine: AsyncEngine) -> None:
        self.metrics.watch(engine, self.served_model_name)
        if self.tool_call_parser == "auto":
            special = engine.tokenizer.get_added_vocab() if engine.tokenizer is not None else {}
            self.tool_format = detect_format(engine.chat_template, special)
        else:
            self.tool_format = self.tool_call_parser  # type: ignore[assignment]
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

    app = FastAPI(title="kvflock worker", version=__version__, lifespan=lifespan)
    api_doc.publish(app, access)
    app.state.worker = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own refusals (unknown path, wrong method, a body it cannot parse) in OpenAI's shape.
        param = "body" if exc.status_code == 400 else None
        return ApiError(exc.status_code, str(exc.detail), param=param, headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", param="body").response()
        return validation_error(exc.errors()).response()

    @app.get("/health", responses=api_doc.errors(500))
    async def health() -> Response:
        engine = state.engine
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=500)
        if engine is not None and (not engine.is_alive or time.monotonic() - engine.last_step_at > STUCK_AFTER_SECONDS):
            return JSONResponse({"status": "engine loop stopped"}, status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", responses=api_doc.errors(503))
    async def ready() -> Response:
        if state.engine is None or state.draining or not state.engine.is_alive:
            reason = "draining" if state.draining else "loading" if state.engine is None else "engine stopped"
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return JSONResponse({"ready": True})

    if serve_metrics:
        @app.get("/metrics", response_class=Response, responses=api_doc.METRICS)
        async def metrics() -> Response:
            return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def drain_status() -> dict[str, Any]:
        in_flight = state.engine.num_in_flight if state.engine else 0
        return {"draining": state.draining, "in_flight": in_flight, "drained": state.draining and in_flight == 0}

    @app.post("/admin/drain", include_in_schema=False)  # the operator's, not part of the published API
    async def drain() -> dict[str, Any]:
        if not state.draining:
            log.info("draining: no new requests are taken")
        state.draining = True
        return drain_status()

    @app.get("/admin/drain", include_in_schema=False)
    async def drain_progress() -> dict[str, Any]:
        return drain_status()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = []
        for name in state.served_names:
            model: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "kvflock",
                                     "root": state.served_model_name}
            if state.engine is not None:
                model["max_model_len"] = state.engine.max_model_len
            data.append(model)
        for name in state.engine.lora_names if state.engine is not None else ():
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "kvflock",
                         "root": state.engine.engine.loras.path(name), "parent": state.served_model_name,
                         "max_model_len": state.engine.max_model_len})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", responses=api_doc.errors(400, 503))
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        engine = state.serving_engine()
        loras = engine.engine.loras
        if loras is None:
            raise ApiError(400, "lora_name: this worker serves no adapters; start it with --enable-lora",
                           param="lora_name")
        if body.lora_name in state.served_names:
            raise ApiError(400, f"lora_name: {body.lora_name!r} is the base model's name", param="lora_name")
        try:  # read and checked off the event loop, registered on the engine thread
            adapter = await asyncio.to_thread(loras.read, body.lora_path)
            await engine.call(lambda: engine.engine.load_lora(body.lora_name, body.lora_path, adapter))
        except ValueError as exc:
            raise error_from_value(exc) from exc
        log.info("loaded LoRA adapter %s from %s", body.lora_name, body.lora_path)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter", responses=api_doc.errors(400, 404, 503))
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        engine = state.serving_engine()
        if body.lora_name not in engine.lora_names:
            raise ApiError(404, f"lora_name: no adapter {body.lora_name!r} is loaded", param="lora_name")
        try:
            await engine.call(lambda: engine.engine.unload_lora(body.lora_name))
        except ValueError as exc:
            raise error_from_value(exc) from exc
        log.info("unloaded LoRA adapter %s", body.lora_name)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.post("/tokenize", responses=api_doc.errors(400, 404, 413, 503))
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> dict[str, Any]:
        engine = _prepare(state, body.model)
        if isinstance(body, TokenizeChatRequest):
            text = _render(engine, body.messages, body.template_tools(), body)
        else:
            text = body.prompt
        tokens = _encode(engine, text, body.add_special_tokens)
        answer: dict[str, Any] = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
        if body.return_token_strs:
            answer["token_strs"] = engine.tokenizer.convert_ids_to_tokens(tokens)
        return answer

    @app.post("/detokenize", responses=api_doc.errors(400, 404, 413, 503))
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        engine = _prepare(state, body.model)
        if engine.tokenizer is None:
            raise ApiError(400, "tokens: this model has no tokenizer", param="tokens")
        vocab_size = len(engine.tokenizer)
        outside = [t for t in body.tokens if not 0 <= t < vocab_size]
        if outside:
            raise ApiError(400, f"tokens: ids must be in [0, {vocab_size}); got {outside[:3]}", param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions", responses=api_doc.GENERATION)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrived = time.monotonic()
        engine = _prepare(state, body.model)
        params = build_or_400(lambda: body.sampling_params(body.max_tokens, body.logprobs))
        grammar = await _compile_grammar(engine, params, body.structured_output_field)
        prompts = body.prompts()
        seam = _seam(body, request)
        stream = await start_requests(state.metrics, engine, [(p, params) for p in prompts], grammar,
                                      _adapter(state, body.model), seam.generated)
        echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts] if body.echo else None
        formatter = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", body.model, body.n, engine, echo)
        return await respond(request, state.metrics, stream, formatter, body.stream, body.include_usage, len(prompts),
                             arrived, seam)

    @app.post("/v1/chat/completions", responses=api_doc.GENERATION)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrived = time.monotonic()
        engine = _prepare(state, body.model)
        reader = _tool_call_reader(state.tool_format, body)
        schema = reader.forcing_schema([tool.model_dump() for tool in body.tools or []]) if reader else None
        constraint = StructuredOutput(json_schema=schema) if schema is not None else None  # a forced tool choice
        params = build_or_400(lambda: body.sampling_params(body.output_limit, body.num_logprobs, constraint))
        field = body.structured_output_field or ("tool_choice" if constraint is not None else None)
        grammar = await _compile_grammar(engine, params, field)
        prompt = _render(engine, body.messages, body.template_tools(), body)
        seam = _seam(body, request)
        stream = await start_requests(state.metrics, engine, [(prompt, params)], grammar, _adapter(state, body.model),
                                      seam.generated)
        formatter = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", body.model, body.n, engine, reader)
        return await respond(request, state.metrics, stream, formatter, body.stream, body.include_usage, 1, arrived,
                             seam)

    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_middleware(AccessControl, policy=access)  # no body is read before the key is checked
    app.add_middleware(RequestIdMiddleware, logger="kvflock.worker.requests")  # refusals carry an id too
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


def _prepare(state: WorkerState, model: str | None) -> AsyncEngine:
    """The engine, for a request that names one of the served names or adapters (or, where the
    field is optional, none)."""
    adapters = state.engine.lora_names if state.engine is not None else ()
    if model is not None and model not in state.served_names and model not in adapters:
        served = ", ".join(repr(name) for name in (*state.served_names, *adapters))
        raise ApiError(404, f"model: {model!r} is not served here; this worker serves {served}", param="model")
    return state.serving_engine()


async def _compile_grammar(engine: AsyncEngine, params: SamplingParams, field: str | None) -> Grammar | None:
    """The request's structured output compiled, before the request enters the engine; a 400
    naming the request's `field` when it does not compile."""
    if params.structured_output is None:
        return None
    try:
        return await engine.compile_grammar(params.structured_output)
    except ValueError as exc:
        if field is None:
            raise error_from_value(exc) from exc
        raise ApiError(400, f"{field}: {str(exc).partition(': ')[2]}", param=field) from exc


def _adapter(state: WorkerState, model: str | None) -> str | None:
    """The LoRA adapter a request's `model` names; None for the base model."""
    return None if model is None or model in state.served_names else model


def _render(engine: AsyncEngine, messages: list[Any], tools: list[dict[str, Any]] | None,
            body: ChatCompletionRequest | TokenizeChatRequest) -> str:
    """The conversation's prompt text (the request's own template, else the engine's)."""
    try:
        return render_chat(engine.tokenizer, [m.as_template_input() for m in messages], tools=tools,
                           chat_template=body.chat_template or engine.chat_template,
                           add_generation_prompt=body.add_generation_prompt,
                           continue_final_message=body.continue_final_message,
                           template_kwargs=body.chat_template_kwargs)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc


def _encode(engine: AsyncEngine, text: str, add_special_tokens: bool) -> list[int]:
    if engine.tokenizer is None:
        raise ApiError(400, "prompt: this model has no tokenizer", param="prompt")
    return list(engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _seam(body: CompletionRequest | ChatCompletionRequest, request: Request) -> Seam:
    """What the router asked of this stream: token ids in its chunks, and where it continues from."""
    continued = body.kvflock_continuation
    return Seam(report_tokens=body.stream and request.headers.get(TOKENS_HEADER) == "1",
                generated=continued.token_ids if continued is not None else None,
                text_chars=continued.text_chars if continued is not None else 0)


def _tool_call_reader(tool_format: ToolCallFormat, body: ChatCompletionRequest) -> ToolCallReader | None:
    if not body.offers_tools:
        return None
    return ToolCallReader(tool_format, required=body.tool_choice == "required", named=body.named_tool,
                          parallel=body.parallel_tool_calls)


