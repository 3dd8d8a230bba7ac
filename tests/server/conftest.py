"""Real uvicorn servers on 127.0.0.1 over engines that share the session's SmolLM2 load."""

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import EngineConfig
from kvflock.worker.engine import LLMEngine
from kvflock.worker.server import WorkerState, create_app

MODEL = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, port: int) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def serve(smollm2) -> Iterator[Callable[..., str]]:
    """Start a worker over SmolLM2 with the given engine/server settings; returns its URL."""
    with_stack: list = []

    def start(max_queued_requests: int = 64, max_request_bytes: int = 1 << 20, **engine_settings) -> str:
        settings = {"max_model_len": 512, **engine_settings}
        engine = LLMEngine(EngineConfig(model="demo", **settings), loaded=smollm2)
        state = WorkerState(served_model_name=MODEL)
        state.set_engine(AsyncEngine(engine, max_queued_requests))
        ctx = running_server(create_app(state, max_request_bytes), free_port())
        url = ctx.__enter__()
        with_stack.append(ctx)
        return url

    yield start
    for ctx in reversed(with_stack):
        ctx.__exit__(None, None, None)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
