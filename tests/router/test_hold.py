"""While no replica can take a request but one may (scaled to zero, starting), the router holds
it, counts it in its metrics for the autoscaler, and sends it on once a replica is ready, or
answers 503 with an OpenAI error body when the hold timeout passes. When nothing can come (no
worker and no scale from zero, or every worker crash-looping) it answers 503 at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import httpx
import pytest

from kvflock.router.app import create_app
from kvflock.router.config import RouterSettings
from kvflock.router.fleet import Endpoint, Fleet
from tests.server.conftest import free_port, running_server

from .conftest import MODEL, metric, token_prompt, wait_for

pytestmark = pytest.mark.timeout(120)


class LateDiscovery:
    """Discovery whose workers appear when the test says so (a scale-up from zero)."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []

    async def run(self, fleet: Fleet, on_settings: Callable[[RouterSettings], None]) -> None:
        while True:
            fleet.update(list(self.endpoints))
            await asyncio.sleep(0.05)


def complete(url: str, timeout: float = 60) -> httpx.Response:
    body = {"model": MODEL, "prompt": token_prompt(1, 1), "max_tokens": 2}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def test_a_request_is_held_until_a_replica_is_ready_and_counted_meanwhile(start_worker):
    discovery = LateDiscovery()
    app = create_app(discovery, RouterSettings(hold_seconds=60, scale_from_zero=True))
    with running_server(app, free_port()) as url:
        assert httpx.get(f"{url}/ready").status_code == 200, "a router that holds requests takes them"
        answers: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answers.append(complete(url)))
        sender.start()
        wait_for(lambda: metric(url, "kvflock_router_held_requests") == 1, what="the request to be held")

        worker = start_worker()
        discovery.endpoints = [Endpoint(id="w-0", url=worker.url)]
        sender.join(timeout=60)
        assert answers and answers[0].status_code == 200, answers
        assert answers[0].headers["x-kvflock-replica"] == "w-0"
        assert metric(url, "kvflock_router_held_requests") == 0


def test_a_held_request_gets_503_with_an_openai_error_when_no_replica_comes():
    app = create_app(LateDiscovery(), RouterSettings(hold_seconds=0.5, scale_from_zero=True))
    with running_server(app, free_port()) as url:
        refused = complete(url)
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["type"] == "service_unavailable" and "within 0.5 s" in error["message"]
        assert metric(url, "kvflock_router_hold_timeouts_total") == 1
        assert metric(url, "kvflock_router_held_requests") == 0


def assert_refused_at_once(response: httpx.Response, why: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["type"] == "service_unavailable" and why in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_without_workers_or_scale_from_zero_a_request_gets_503_at_once():
    app = create_app(LateDiscovery(), RouterSettings(hold_seconds=3600))
    with running_server(app, free_port()) as url:
        assert_refused_at_once(complete(url, timeout=30), "there is no worker")
        assert metric(url, "kvflock_router_hold_timeouts_total") == 0


def test_when_every_worker_crash_loops_a_request_gets_503_at_once():
    discovery = LateDiscovery()
    discovery.endpoints = [Endpoint(id=f"w-{i}", url=f"http://127.0.0.1:{free_port()}", pod_ready=False,
                                    may_become_ready=False) for i in range(2)]
    app = create_app(discovery, RouterSettings(hold_seconds=3600))
    with running_server(app, free_port()) as url:
        wait_for(lambda: httpx.get(f"{url}/health").json()["replicas"] == 2, what="the workers to be discovered")
        assert_refused_at_once(complete(url, timeout=30), "every worker (2) is crash-looping")


def test_a_request_held_for_a_starting_worker_gets_503_as_soon_as_it_crash_loops():
    discovery = LateDiscovery()
    starting = Endpoint(id="w-0", url=f"http://127.0.0.1:{free_port()}", pod_ready=False)
    discovery.endpoints = [starting]
    app = create_app(discovery, RouterSettings(hold_seconds=3600))
    with running_server(app, free_port()) as url:
        wait_for(lambda: httpx.get(f"{url}/health").json()["replicas"] == 1, what="the worker to be discovered")
        answers: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answers.append(complete(url, timeout=30)))
        sender.start()
        wait_for(lambda: metric(url, "kvflock_router_held_requests") == 1, what="the request to be held")
        discovery.endpoints = [Endpoint(id="w-0", url=starting.url, pod_ready=False, may_become_ready=False)]
        sender.join(timeout=30)
        assert answers, "the held request was not answered"
        assert_refused_at_once(answers[0], "crash-looping")
