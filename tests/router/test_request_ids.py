"""Request ids and JSON logs across a real router and worker: the client's X-Request-Id (or
one the router makes) reaches the worker, both log it, and the client gets it back."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvflock.shared.logs import JsonFormatter, TextFormatter, request_id
from tests.polling import wait_for
from tests.server.conftest import free_port

from .conftest import MODEL, client


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the root logger writes while the test runs, as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def request_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["logger"].endswith(".requests")]


def test_the_clients_request_id_reaches_the_worker_and_comes_back(start_worker, start_router,
                                                                 json_lines: io.StringIO) -> None:
    router = start_router([start_worker().url])
    reply = client(router).completions.with_raw_response.create(
        model=MODEL, prompt=[1, 2, 3], max_tokens=2, extra_headers={"X-Request-Id": "client-abc-1"})
    assert reply.headers["x-request-id"] == "client-abc-1"
    assert reply.parse().choices[0].text is not None

    lines = wait_for(lambda: len(request_lines(json_lines)) >= 2 and request_lines(json_lines), what="two log lines")
    assert {line["logger"] for line in lines} == {"kvflock.router.requests", "kvflock.worker.requests"}
    for line in lines:
        assert line["request_id"] == "client-abc-1"
        assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/completions", 200)
        assert line["level"] == "info" and line["ts"].endswith("+00:00") and "duration_ms" in line


def test_the_router_makes_an_id_when_the_client_sends_none_or_a_bad_one(start_worker, start_router,
                                                                       json_lines: io.StringIO) -> None:
    router = start_router([start_worker().url])
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
    made = httpx.post(f"{router}/v1/completions", json=body, timeout=60)
    too_long = httpx.post(f"{router}/v1/completions", json=body, timeout=60, headers={"X-Request-Id": "x" * 500})
    refused = httpx.post(f"{router}/v1/completions", json={**body, "max_tokens": -1}, timeout=60,
                         headers={"X-Request-Id": "bad-body"})
    ids = [made.headers["x-request-id"], too_long.headers["x-request-id"]]
    assert all(len(rid) == 32 for rid in ids) and ids[0] != ids[1]
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "bad-body"

    lines = wait_for(lambda: len(request_lines(json_lines)) >= 6 and request_lines(json_lines), what="six log lines")
    by_id: dict[str, set[str]] = {}
    for line in lines:
        by_id.setdefault(line["request_id"], set()).add(line["logger"])
    assert by_id == {rid: {"kvflock.router.requests", "kvflock.worker.requests"} for rid in [*ids, "bad-body"]}


def test_probes_and_scrapes_are_not_logged_as_requests(start_worker, json_lines: io.StringIO) -> None:
    worker = start_worker().url
    assert httpx.get(f"{worker}/metrics").status_code == 200
    assert "x-request-id" not in httpx.get(f"{worker}/health").headers
    assert request_lines(json_lines) == []


def test_formatters_write_one_schema_with_extra_fields_and_tracebacks() -> None:
    logger = logging.getLogger("kvflock.test")
    record = logger.makeRecord("kvflock.test", logging.WARNING, __file__, 1, "loaded %d of %d", (1, 2), None,
                               extra={"shard": "model-00001.safetensors"})
    token = request_id.set("r-1")
    try:
        line = json.loads(JsonFormatter().format(record))
        text = TextFormatter().format(record)
    finally:
        request_id.reset(token)
    assert list(line)[:4] == ["ts", "level", "logger", "msg"]
    assert line == {**line, "level": "warning", "logger": "kvflock.test", "msg": "loaded 1 of 2", "request_id": "r-1",
                    "shard": "model-00001.safetensors"}
    assert text.endswith("WARNING kvflock.test: loaded 1 of 2 [request_id=r-1]")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logger.makeRecord("kvflock.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "RuntimeError: boom" in json.loads(JsonFormatter().format(failed))["exc"]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def test_the_cli_writes_json_lines_for_uvicorn_too() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvflock.cli", "--log-format", "json", "router", "--worker", "http://127.0.0.1:9",
         "--host", "127.0.0.1", "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), 60, "the router")
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    assert any(line["logger"] == "uvicorn.error" and "Uvicorn running" in line["msg"] for line in lines), lines


def test_a_bad_log_format_is_a_one_line_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "kvflock.cli", "--log-format", "xml", "status"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("argument --log-format: invalid choice: 'xml' "
                                                         "(choose from 'text', 'json')")
