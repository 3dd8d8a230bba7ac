"""The worker's and the router's APIs swept from the worker's published OpenAPI document
(schemathesis, bounded and derandomized for CI): no answer is a 5xx, and every answer's status,
content type, headers and body match what the document says. The router answers the same API
in front of the worker, so the same document holds it. The tiny random Llama keeps each generated
request cheap; `model` is set to the served name so that requests reach the engine."""

import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvflock.router.app import RouterOptions, StaticDiscovery
from kvflock.router.app import create_app as create_router_app
from kvflock.router.discovery import parse_worker_flag
from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import EngineConfig
from kvflock.worker.engine import LLMEngine
from kvflock.worker.server import WorkerState, create_app
from tests.polling import wait_for
from tests.server.conftest import free_port, running_server

pytestmark = pytest.mark.slow

SERVED = "tiny"
# What the sweep holds every answer to. Not positive_data_acceptance: some limits span fields or
# depend on the model (max_tokens against the context, top_logprobs needing logprobs) and are 400s
# for bodies that the schema alone admits.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
SWEEP = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def worker_url(tiny_llama) -> Iterator[str]:
    config = EngineConfig(model=str(tiny_llama.source.path), max_model_len=64, num_kv_blocks=64, max_num_seqs=8)
    state = WorkerState(served_model_name=SERVED)
    state.set_engine(AsyncEngine(LLMEngine(config, loaded=tiny_llama), 16))
    with running_server(create_app(state), free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def router_url(worker_url) -> Iterator[str]:
    app = create_router_app(StaticDiscovery([parse_worker_flag(worker_url)]), options=RouterOptions(poll_interval=0.2))
    with running_server(app, free_port()) as url:
        fleet = app.state.router.fleet
        wait_for(lambda: any(v.serving for v in fleet.views(time.monotonic())), timeout=30,
                 what="the router to see its worker ready")
        yield url


def _sweep(schema_url: str, base_url: str) -> list[str]:
    """Every operation of the document at `schema_url` that `base_url` serves too (its own
    document lists it), called there; the failures."""
    schema = schemathesis.openapi.from_url(schema_url)
    served = httpx.get(f"{base_url}/openapi.json").json()["paths"]
    failures = []
    for found in schema.get_all_operations():
        operation = found.ok()
        if operation.path not in served:  # the worker's own: LoRA adapter loading is the operator's, per worker
            continue

        @given(case=operation.as_strategy())
        @SWEEP
        def call(case) -> None:
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = SERVED  # so that requests reach the engine
            case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)

        try:
            call()
        except Exception as exc:  # one operation's failure, reported beside the others
            failures.append(f"{operation.label}: {exc}")
    return failures


def test_the_worker_answers_as_its_document_says(worker_url):
    failures = _sweep(f"{worker_url}/openapi.json", worker_url)
    assert not failures, "\n\n".join(failures)


def test_the_router_answers_as_the_worker_document_says(worker_url, router_url):
    failures = _sweep(f"{worker_url}/openapi.json", router_url)
    assert not failures, "\n\n".join(failures)
