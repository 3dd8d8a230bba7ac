"""The router's HTTP app: the OpenAI API in front of the workers, plus its own probes and metrics.

/v1/completions and /v1/chat/completions are routed by the prompt and, for a LoRA adapter, to a replica
that serves it (`policy`), their bodies passed on unchanged; /v1/models lists what the serving replicas
list (the model and every adapter any of them serves); vLLM's /tokenize, /detokenize and /version go
to any ready replica; /health says the router runs, /ready that it takes requests (some replica
can serve, or it holds requests until one can: `hold_seconds`), and
/metrics is the router's own (`kvflock_router_*`); `access` (kvflock/shared/auth.py) decides which
need a key, and `internal_token` is what the router shows the workers instead. Discovery, polling and routing settings
all live on the app's event loop, started and stopped with it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from kvflock.router.config import RouterSettings
from kvflock.router.fleet import Endpoint, Fleet
from kvflock.router.metrics import RouterMetrics
from kvflock.router.policy import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_SLACK, Policy, RequestFeatures, Router
from kvflock.router.poller import DEFAULT_INTERVAL, Poller
from kvflock.router.prompt import PromptReader
from kvflock.router.proxy import DEFAULT_MAX_ATTEMPTS, Proxy, error_response
from kvflock.shared import api_doc
from kvflock.shared.auth import AccessControl, AccessPolicy, bearer_header
from kvflock.shared.logs import REQUEST_ID_HEADER, RequestIdMiddleware
from kvflock.shared.request_text import LONE_SURROGATE, first_lone_surrogate
from kvflock.shared.stream_seam import CONTINUATION_FIELD
from kvflock.shared.version import __version__

# Prompts over this many characters are tokenized off the event loop.
_TOKENIZE_INLINE_CHARS = 2048


class Discovery(Protocol):
    async def run(self, fleet: Fleet, on_settings: Callable[[RouterSettings], None]) -> None:
        """Keep `fleet` up to date (and report settings found on the way) until cancelled."""


class StaticDiscovery:
    """A fixed list of workers (`--worker`), each ready as far as discovery knows."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("worker: give at least one --worker URL, or --service to discover them")
        ids = [e.id for e in endpoints]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker: each URL may be given once, got {ids}")
        self.endpoints = endpoints

    async def run(self, fleet: Fleet, on_settings: Callable[[RouterSettings], None]) -> None:
        fleet.update(self.endpoints)
        await asyncio.Event().wait()


@dataclass(frozen=True)
class RouterOptions:
    policy: Policy | None = None  # None: the settings' policy (the InferenceService's router.policy)
    block_size: int | None = None  # None: the settings' block size (the workers' engine.json)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    poll_interval: float = DEFAULT_INTERVAL
    load_factor: float = DEFAULT_LOAD_FACTOR
    load_slack: int = DEFAULT_LOAD_SLACK
    access: AccessPolicy = AccessPolicy()
    internal_token: bytes | None = None  # sent to workers in place of the client's Authorization
    hold_seconds: float | None = None  # None: the settings' hold timeout (router.holdTimeoutSeconds)


@dataclass
class RouterState:
    """What the endpoints share; `app.state.router` for tests and embedding."""

    fleet: Fleet
    router: Router
    reader: PromptReader
    metrics: RouterMetrics
    proxy: Proxy


def create_app(discovery: Discovery, settings: RouterSettings = RouterSettings(), tokenizer: Any | None = None,
               options: RouterOptions = RouterOptions()) -> FastAPI:
    clock = time.monotonic
    fleet = Fleet()
    router = Router(options.policy or settings.policy, settings.pools, options.load_factor, options.load_slack)
    reader = PromptReader(options.block_size or settings.block_size, tokenizer)
    metrics = RouterMetrics(fleet, clock)
    # Keep-alive shorter than uvicorn's 5 s, so the router never reuses a connection that the
    # worker is closing (that would look like a replica dying).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=4.0)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=2.0), limits=limits)
    hold = settings.hold_seconds if options.hold_seconds is None else options.hold_seconds
    state = RouterState(fleet, router, reader, metrics, Proxy(fleet, router, metrics, client, options.max_attempts, clock,
                                                                  options.internal_token, hold, settings.scale_from_zero))

    def apply_settings(new: RouterSettings) -> None:
        router.pools = new.pools
        if options.policy is None:
            router.policy = new.policy
        if options.block_size is None:
            reader.block_size = new.block_size
        if options.hold_seconds is None:
            state.proxy.hold_seconds = new.hold_seconds
        state.proxy.scale_from_zero = new.scale_from_zero

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        poller = Poller(fleet, router.index, client, options.poll_interval)
        tasks = [asyncio.create_task(discovery.run(fleet, apply_settings), name="kvflock-router-discovery"),
                 asyncio.create_task(poller.run(), name="kvflock-router-poller")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()

    app = FastAPI(title="kvflock router", version=__version__, lifespan=lifespan)
    app.state.router = state
    api_doc.publish(app, options.access)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        # Starlette's own refusals (unknown path, wrong method) in OpenAI's shape.
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "replicas": len(fleet.replicas)}

    @app.get("/ready", responses=api_doc.errors(503))
    async def ready() -> Response:
        """Whether it takes requests: some replica serves, or it holds requests until one does."""
        serving = sum(1 for view in fleet.views(clock()) if view.serving)
        if serving == 0 and state.proxy.hold_seconds <= 0:
            return JSONResponse({"ready": False, "reason": "no replica is ready"}, status_code=503)
        return JSONResponse({"ready": True, "replicas": serving})

    @app.get("/metrics", response_class=Response, responses=api_doc.METRICS)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def any_replica(request: Request) -> Response:
        """What every replica answers alike."""
        body = await request.body()
        return await state.proxy.forward(request, request.url.path, body, RequestFeatures(prompt_tokens=0))

    for path, method in [("/version", "GET"), ("/tokenize", "POST"), ("/detokenize", "POST")]:
        app.add_api_route(path, any_replica, methods=[method])

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        """Every serving replica's models, each name once: replicas may serve different adapters.
        With none serving, one replica's answer as for the other paths (held, or 503)."""
        urls = [r.url for r in fleet.replicas.values() if r.view(clock()).serving]
        headers = {REQUEST_ID_HEADER: request.headers.get(REQUEST_ID_HEADER, "")}
        if options.internal_token:
            headers["authorization"] = bearer_header(options.internal_token)
        answers = await asyncio.gather(*(client.get(f"{url}/v1/models", headers=headers, timeout=10) for url in urls),
                                       return_exceptions=True)
        found: dict[str, Any] = {}
        for answer in answers:
            if isinstance(answer, httpx.Response) and answer.status_code == 200:
                for model in _model_list(answer):
                    found.setdefault(model["id"], model)
        if not found:
            return await any_replica(request)
        return JSONResponse({"object": "list", "data": list(found.values())})

    async def generate(request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
            return error_response(400, f"the body is not valid JSON: {exc}", "invalid_request_error", param="body")
        if not isinstance(body, dict):
            return error_response(400, "the body must be a JSON object", "invalid_request_error", param="body")
        if CONTINUATION_FIELD in body:
            return error_response(400, f"{CONTINUATION_FIELD}: set by the router only, when it continues a stream on "
                                  "another replica", "invalid_request_error", param=CONTINUATION_FIELD)
        where = first_lone_surrogate(body)
        if where is not None:
            return error_response(400, f"{where}: {LONE_SURROGATE}", "invalid_request_error", param=where)
        metrics.arrived(body)
        # An unknown model goes to any replica, which answers OpenAI's 404 naming what it serves.
        model = body.get("model")
        adapter = model if isinstance(model, str) and model in fleet.adapters() else None
        if reader.tokenizer is not None and len(raw) > _TOKENIZE_INLINE_CHARS:
            features = await asyncio.to_thread(reader.features, path, body, adapter)
        else:
            features = reader.features(path, body, adapter)
        return await state.proxy.forward(request, path, raw, features, body)

    @app.post("/v1/completions", responses=api_doc.GENERATION)
    async def completions(request: Request) -> Response:
        return await generate(request, "/v1/completions")

    @app.post("/v1/chat/completions", responses=api_doc.GENERATION)
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "/v1/chat/completions")

    app.add_middleware(AccessControl, policy=options.access)
    # Outermost: the id is in the headers the proxy forwards, so the worker logs and returns the same one.
    app.add_middleware(RequestIdMiddleware, logger="kvflock.router.requests")
    return app


def _model_list(answer: httpx.Response) -> list[dict[str, Any]]:
    """The entries of a worker's /v1/models answer (none from a malformed one)."""
    try:
        data = answer.json()["data"]
    except (ValueError, KeyError, TypeError):
        return []
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] if isinstance(data, list) else []
