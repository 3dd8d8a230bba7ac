"""Bad input gets the right 4xx with an OpenAI-style error body naming the field, and the
server keeps serving; a full queue gets 429 with Retry-After instead of a timeout."""

import json

import httpx
import pytest

from tests.server.conftest import MODEL

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def url(smollm2):
    from tests.server.conftest import free_port, running_server
    from kvflock.worker.async_engine import AsyncEngine
    from kvflock.worker.config import EngineConfig
    from kvflock.worker.engine import LLMEngine
    from kvflock.worker.server import WorkerState, create_app

    state = WorkerState(served_model_name=MODEL)
    state.set_engine(AsyncEngine(LLMEngine(EngineConfig(model="demo", max_model_len=256), loaded=smollm2)))
    with running_server(create_app(state, max_request_bytes=64 * 1024), free_port()) as base:
        yield base


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        (CHAT, {"model": MODEL, "messages": "hello"}, 400, "messages"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
        (CHAT, {"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "max_tokens": 100_000}, 400, "max_tokens"),
        (CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "n": 0}, 400, "n"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "temperature": -1}, 400, "temperature"),
        (CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 99999999]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 10, "top_p": 1.5}, 400, "top_p"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [[False, True]]}, 400, "prompt.0.0"),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "n": 3.0}, 400, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": True}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "seed": 2**64}, 400, "seed"),
        ("/v1/completions", {"model": MODEL, "prompt": ["Hi"] * 400}, 400, "prompt"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ],
)
def test_bad_request_gets_an_error_naming_the_field_and_the_server_keeps_serving(url, path, body, status, param):
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] and param.split(".")[0] in error["message"]
    assert _still_serving(url)


def test_malformed_json_is_a_400(url):
    response = httpx.post(url + CHAT, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "body"
    assert _still_serving(url)


def test_oversized_body_is_a_413(url):
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]}
    response = httpx.post(url + CHAT, json=huge)
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]["message"]
    assert _still_serving(url)


def test_overload_beyond_the_queue_gets_429_with_retry_after(serve):
    base = serve(max_num_seqs=1, max_queued_requests=0)
    body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{base}/v1/completions", json=body) as busy:
        lines = busy.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)
        response = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "Hi"}, timeout=10)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def _still_serving(url: str) -> bool:
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    return ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) > 0


def _raw_post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": MODEL, "prompt": "hi \ud800"}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "hi \ud800"], "stream": True}, "prompt.1"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi \udfff"}], "stream": True},
     "messages.0.content"),
])
def test_a_lone_surrogate_is_a_400_naming_where_it_is(url, path, body, param):
    response = _raw_post(url + path, json.dumps(body).encode())  # ASCII escapes carry the surrogate
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]
    assert _still_serving(url)


@pytest.mark.parametrize("body", [b'{"model": "x", "prompt": "\xff\xfe"}',
                                  b"[" * 30_000 + b"]" * 30_000, b'{"model": "x", "prompt": "Hi"'],
                         ids=["invalid UTF-8", "nested 30,000 deep", "truncated"])
def test_a_body_that_does_not_parse_is_an_openai_shaped_400(url, body):
    response = _raw_post(url + "/v1/completions", body)
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert _still_serving(url)


def test_unknown_paths_and_methods_get_openai_shaped_errors(url):
    for response, status in ((httpx.get(url + "/v1/nothing"), 404), (httpx.get(url + CHAT), 405)):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_more_prompts_than_the_queue_holds_are_refused_at_once(url):
    response = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": ["Hi"] * 400, "max_tokens": 64},
                          timeout=60)
    assert response.status_code == 400
    assert "several requests" in response.json()["error"]["message"]
