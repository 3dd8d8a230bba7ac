"""Real workers (uvicorn on 127.0.0.1, over engines sharing one tiny random Llama) and a real
router in front of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import openai
import pytest

from kvflock.router.app import RouterOptions, StaticDiscovery, create_app
from kvflock.router.config import RouterSettings
from kvflock.router.discovery import parse_worker_flag
from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import EngineConfig
from kvflock.worker.engine import LLMEngine
from kvflock.worker.server import WorkerState
from kvflock.worker.server import create_app as create_worker_app
from tests.polling import wait_for
from tests.server.conftest import free_port, running_server

MODEL = "tiny"


@dataclass
class Worker:
    url: str
    stop: Callable[[], None]


@pytest.fixture
def start_worker(tiny_llama) -> Iterator[Callable[..., Worker]]:
    """Start a worker over the tiny Llama; `stop()` shuts its server down (as a crash would,
    for clients: its port refuses connections from then on)."""
    with ExitStack() as stack:

        def start(max_queued_requests: int = 64, **engine_settings) -> Worker:
            settings = {"max_model_len": 512, "num_kv_blocks": 256, **engine_settings}
            engine = LLMEngine(EngineConfig(model=str(tiny_llama.source.path), **settings), loaded=tiny_llama)
            state = WorkerState(served_model_name=MODEL)
            state.set_engine(AsyncEngine(engine, max_queued_requests))
            server = running_server(create_worker_app(state), free_port())
            url = server.__enter__()
            stopped = False

            def stop() -> None:
                nonlocal stopped
                if not stopped:
                    stopped = True
                    server.__exit__(None, None, None)

            stack.callback(stop)
            return Worker(url, stop)

        yield start


@pytest.fixture
def start_router() -> Iterator[Callable[..., str]]:
    """Start a router over the given worker URLs (`[POOL=]URL`); returns its URL once it is ready."""
    with ExitStack() as stack:

        def start(workers: list[str], policy: str = "prefix-aware", settings: RouterSettings = RouterSettings(),
                  poll_interval: float = 0.2) -> str:
            discovery = StaticDiscovery([parse_worker_flag(w) for w in workers])
            app = create_app(discovery, settings, options=RouterOptions(policy=policy, poll_interval=poll_interval))
            url = stack.enter_context(running_server(app, free_port()))
            wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, what="the router to be ready")
            return url

        yield start


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a router metric's samples that carry `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def token_prompt(prefix: int, suffix: int, prefix_tokens: int = 96, suffix_tokens: int = 8) -> list[int]:
    """Token ids: a shared prefix of `prefix` and a distinct tail (the tiny model has no tokenizer)."""
    head = [(prefix * 37 + i) % 250 + 1 for i in range(prefix_tokens)]
    tail = [(suffix * 11 + i) % 250 + 1 for i in range(suffix_tokens)]
    return head + tail
