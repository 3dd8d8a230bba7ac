"""A worker continues a stream another worker started (kvflock.shared.stream_seam): given the
tokens the client has, it streams what follows, and the two parts read as the undisturbed
stream: same text, finish reason, usage and logprobs, stop strings found across the seam,
max_tokens counted from the start."""

import json
from typing import Any

import httpx
import pytest

from kvflock.shared.stream_seam import CONTINUATION_FIELD, EXTENSION, TOKENS_HEADER
from tests.server.conftest import MODEL

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "Name three rivers of Europe and say one thing about each."}]
PROMPT = "A short story about a lighthouse keeper: Once upon a time"


@pytest.fixture(scope="module")
def url(smollm2):
    from kvflock.worker.async_engine import AsyncEngine
    from kvflock.worker.config import EngineConfig
    from kvflock.worker.engine import LLMEngine
    from kvflock.worker.server import WorkerState, create_app
    from tests.server.conftest import free_port, running_server

    state = WorkerState(served_model_name=MODEL)
    state.set_engine(AsyncEngine(LLMEngine(EngineConfig(model="demo", max_model_len=512), loaded=smollm2)))
    with running_server(create_app(state), free_port()) as served:
        yield served
    state.engine = None


def stream(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a stream asked for with token ids, `[DONE]` checked and left out."""
    events = []
    with httpx.stream("POST", f"{url}{path}", json={"model": MODEL, "stream": True, **body},
                      headers={TOKENS_HEADER: "1"}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def tokens(chunks: list[dict[str, Any]]) -> list[int]:
    return [t for c in chunks for choice in c["choices"] for t in choice[EXTENSION]["token_ids"]]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(choice.get("text") or choice.get("delta", {}).get("content") or ""
                   for c in chunks for choice in c["choices"])


def split(chunks: list[dict[str, Any]], at: int) -> tuple[list[int], int]:
    """The tokens and text length the client had after the chunk that brought token `at`."""
    seen: list[int] = []
    for c in chunks:
        for choice in c["choices"]:
            seen += choice[EXTENSION]["token_ids"]
            if len(seen) >= at:
                return seen, choice[EXTENSION]["text_chars"]
    raise AssertionError(f"the stream has fewer than {at} tokens")


def continued(url: str, path: str, body: dict[str, Any], undisturbed: list[dict[str, Any]], at: int
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The undisturbed stream's chunks up to the seam, and the continuation's."""
    seen, text_chars = split(undisturbed, at)
    before = []
    for c in undisturbed:
        before.append(c)
        if len(tokens(before)) >= len(seen):
            break
    after = stream(url, path, {**body, CONTINUATION_FIELD: {"token_ids": seen, "text_chars": text_chars}})
    return before, after


def test_a_continued_completion_reads_as_the_undisturbed_stream(url):
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 24, "logprobs": 2,
            "stream_options": {"include_usage": True}}
    undisturbed = stream(url, "/v1/completions", body)
    before, after = continued(url, "/v1/completions", body, undisturbed, 9)

    assert text_of(before) + text_of(after) == text_of(undisturbed)
    assert tokens(before) + tokens(after) == tokens(undisturbed)
    assert after[-1]["usage"] == undisturbed[-1]["usage"]
    assert after[-2]["choices"][0]["finish_reason"] == undisturbed[-2]["choices"][0]["finish_reason"] == "length"
    logprobs = [lp for c in (*before, *after) for choice in c["choices"] for lp in choice["logprobs"]["tokens"]]
    assert logprobs == [lp for c in undisturbed for choice in c["choices"] for lp in choice["logprobs"]["tokens"]]


def test_a_continued_chat_stream_reads_as_the_undisturbed_one(url):
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 32}
    undisturbed = stream(url, "/v1/chat/completions", body)
    before, after = continued(url, "/v1/chat/completions", body, undisturbed, 12)

    assert text_of(before) + text_of(after) == text_of(undisturbed)
    assert "role" not in after[0]["choices"][0]["delta"]  # the client has had the role already
    assert after[-1]["choices"][0]["finish_reason"] == undisturbed[-1]["choices"][0]["finish_reason"]


def test_a_stop_string_that_spans_the_seam_ends_the_continuation(url):
    plain = {"prompt": PROMPT, "temperature": 0, "max_tokens": 24}
    text = text_of(stream(url, "/v1/completions", plain))
    stop = text[12:20]
    body = {**plain, "stop": [stop]}
    undisturbed = stream(url, "/v1/completions", body)
    assert undisturbed[-1]["choices"][0]["finish_reason"] == "stop"
    # The seam just before the token that completes the stop string: it began before the seam.
    at = len(tokens(undisturbed)) - 1
    before, after = continued(url, "/v1/completions", body, undisturbed, at)

    assert text_of(before) + text_of(after) == text_of(undisturbed)
    assert after[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_counts_the_tokens_before_the_seam(url):
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 10, "ignore_eos": True}
    undisturbed = stream(url, "/v1/completions", body)
    before, after = continued(url, "/v1/completions", body, undisturbed, 4)
    assert len(tokens(before)) + len(tokens(after)) == 10


@pytest.mark.parametrize(("extra", "param"), [
    ({"stream": False}, CONTINUATION_FIELD),
    ({"n": 2}, CONTINUATION_FIELD),
    ({"prompt": ["one", "two"]}, CONTINUATION_FIELD),
    ({"max_tokens": 3}, f"{CONTINUATION_FIELD}.token_ids"),
])
def test_a_continuation_it_cannot_honour_is_refused_naming_the_field(url, extra, param):
    body = {"model": MODEL, "prompt": PROMPT, "stream": True, "max_tokens": 8,
            CONTINUATION_FIELD: {"token_ids": [1, 2, 3], "text_chars": 3}, **extra}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and CONTINUATION_FIELD in error["message"]
