"""Workers and routers with keys on, as real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest

from kvflock.router.app import RouterOptions, StaticDiscovery
from kvflock.router.app import create_app as create_router_app
from kvflock.router.discovery import parse_worker_flag
from kvflock.shared.auth import AccessPolicy
from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import EngineConfig
from kvflock.worker.engine import LLMEngine
from kvflock.worker.server import WorkerState, create_app
from tests.polling import wait_for
from tests.server.conftest import free_port, running_server

USER_KEY = "sk-kvflock-user-7f3a9c"
SECOND_USER_KEY = "sk-kvflock-user-second-41d2"
OTHER_SERVICE_KEY = "sk-kvflock-other-service-0b8e"
ADMIN_TOKEN = "kvflock-admin-5e1c77"
INTERNAL_TOKEN = "kvflock-internal-93ad02"


def keys(*values: str) -> tuple[bytes, ...]:
    return tuple(v.encode() for v in values)


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def start_worker(request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """Start a worker over the fixture `model` ("smollm2" or "tiny_llama") behind `access`."""
    with ExitStack() as stack:

        def start(access: AccessPolicy, model: str = "smollm2", serve_metrics: bool = True) -> str:
            loaded = request.getfixturevalue(model)
            source = "demo" if model == "smollm2" else str(loaded.source.path)
            engine = LLMEngine(EngineConfig(model=source, max_model_len=512, num_kv_blocks=256), loaded=loaded)
            state = WorkerState(served_model_name=model)
            state.set_engine(AsyncEngine(engine, 64))
            app = create_app(state, access=access, serve_metrics=serve_metrics)
            return stack.enter_context(running_server(app, free_port()))

        yield start


@pytest.fixture
def start_router() -> Iterator[Callable[..., str]]:
    """Start a router over worker URLs with `options`; returns its URL once it is ready."""
    with ExitStack() as stack:

        def start(workers: list[str], options: RouterOptions) -> str:
            app = create_router_app(StaticDiscovery([parse_worker_flag(w) for w in workers]), options=options)
            url = stack.enter_context(running_server(app, free_port()))
            wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, what="the router to be ready")
            return url

        yield start
