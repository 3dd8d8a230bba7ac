"""Streams that survive their worker: two real SmolLM2 workers (`kvflock serve`, each its own
process) behind a real router; the worker serving a stream is SIGKILLed mid-way, and the router
continues the stream on the other from the tokens the client has: the client's stream goes on
with no gap and no duplicate, greedy output identical to an undisturbed run. A non-streaming
request whose worker dies is answered whole by the other; a sampled stream finishes too.
And the router's reading of the worker's events (kvflock.router.resume), by itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from kvflock.router.app import RouterOptions, StaticDiscovery, create_app
from kvflock.router.discovery import parse_worker_flag
from kvflock.router.resume import StreamLedger, continuable
from kvflock.shared.stream_seam import CONTINUATION_FIELD, EXTENSION
from tests.polling import wait_for
from tests.server.conftest import free_port, running_server

MODEL = "smollm2"
PROMPT = "A short story about a lighthouse keeper: Once upon a time"
QUESTION = [{"role": "user", "content": "Name three rivers of Europe and say one thing about each."}]


def _chunk(text: str, token_ids: list[int], text_chars: int, finish: str | None = None, id_: str = "cmpl-a") -> bytes:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None,
              EXTENSION: {"token_ids": token_ids, "text_chars": text_chars, "prompt_tokens": 5}}
    event = {"id": id_, "object": "text_completion", "created": 7, "model": MODEL, "choices": [choice]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def test_the_ledger_relays_whole_events_without_the_token_ids_and_keeps_them():
    ledger = StreamLedger({"prompt": "x", "stream": True})
    first, second = _chunk("Once", [11], 4), _chunk(" upon", [12], 9)
    relayed = ledger.relay(first + second[:10])  # the second event is cut mid-way
    assert relayed.count(b"\n\n") == 1 and EXTENSION.encode() not in relayed
    assert ledger.token_ids == [11] and ledger.text_chars == 4
    ledger.restart()  # the replica died: its partial event is never relayed
    assert ledger.continuation()[CONTINUATION_FIELD] == {"token_ids": [11], "text_chars": 4}
    continued = ledger.relay(_chunk(" upon", [12], 9, id_="cmpl-b"))
    assert json.loads(continued.removeprefix(b"data: "))["id"] == "cmpl-a"  # one stream, one id


def test_a_stream_cut_after_its_choice_finished_is_ended_by_the_router():
    ledger = StreamLedger({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    ledger.relay(_chunk("Once", [11, 12], 4, finish="length"))
    ending = ledger.ending().decode()
    usage = json.loads(ending.split("\n\n")[0].removeprefix("data: "))["usage"]
    assert usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert ending.endswith("data: [DONE]\n\n") and ledger.done


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/completions", {"prompt": "x", "stream": True}, True),
    ("/v1/completions", {"prompt": [1, 2], "stream": True}, True),
    ("/v1/completions", {"prompt": ["x", "y"], "stream": True}, False),
    ("/v1/completions", {"prompt": "x", "stream": True, "n": 2}, False),
    ("/v1/chat/completions", {"messages": [], "stream": True}, True),
    ("/v1/chat/completions", {"messages": []}, False),
])
def test_only_streams_of_one_choice_are_continued(path, body, expected):
    assert continuable(path, body) is expected


def test_a_client_cannot_send_the_routers_continuation_field():
    app = create_app(StaticDiscovery([parse_worker_flag(f"http://127.0.0.1:{free_port()}")]))
    with running_server(app, free_port()) as router:
        answer = httpx.post(f"{router}/v1/completions", json={
            "model": MODEL, "prompt": "x", "stream": True, CONTINUATION_FIELD: {"token_ids": [1], "text_chars": 1}})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == CONTINUATION_FIELD


@dataclass
class Fleet:
    router: str
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # by URL

    def kill(self, url: str) -> None:
        self.workers[url].send_signal(signal.SIGKILL)
        self.workers[url].wait()

    def revive(self) -> None:
        for url, process in self.workers.items():
            if process.poll() is not None:
                self.workers[url] = _start_worker(url)
        for url in self.workers:
            wait_for(lambda: _ready(url), 180, f"the worker at {url} to be ready")


def _start_worker(url: str) -> subprocess.Popen:
    port = url.rsplit(":", 1)[1]
    return subprocess.Popen([sys.executable, "-P", "-m", "kvflock.cli", "serve", "--model", "demo",
                             "--served-model-name", MODEL, "--device", "cpu", "--dtype", "float32",
                             "--max-model-len", "512", "--host", "127.0.0.1", "--port", port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    found = Fleet(router="", workers={url: _start_worker(url) for url in urls})
    try:
        found.revive()
        app = create_app(StaticDiscovery([parse_worker_flag(u) for u in urls]),
                         options=RouterOptions(policy="least-loaded", poll_interval=0.2))
        with running_server(app, free_port()) as router:
            found.router = router
            wait_for(lambda: httpx.get(f"{router}/ready").status_code == 200, what="the router to be ready")
            yield found
    finally:
        for process in found.workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _metric(url: str, name: str) -> float:
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[1]) if lines else 0.0


def test_a_completion_stream_whose_worker_is_killed_goes_on_identical_to_an_undisturbed_one(fleet):
    fleet.revive()
    api = _client(fleet.router)
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 48, "extra_body": {"ignore_eos": True},
            "stream_options": {"include_usage": True}}
    undisturbed = list(api.completions.create(**body, stream=True))
    resumed_before = _metric(fleet.router, "kvflock_router_resumed_streams_total")

    raw = api.completions.with_raw_response.create(**body, stream=True)
    chunks = []
    for i, chunk in enumerate(raw.parse()):
        chunks.append(chunk)
        if i == 8:
            fleet.kill(raw.headers["x-kvflock-replica"])

    def text(stream: list) -> str:
        return "".join(c.choices[0].text for c in stream if c.choices)

    assert text(chunks) == text(undisturbed)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage == undisturbed[-1].usage and chunks[-1].usage.completion_tokens == 48
    assert len({c.id for c in chunks}) == 1
    assert _metric(fleet.router, "kvflock_router_resumed_streams_total") == resumed_before + 1


def test_a_chat_stream_whose_worker_is_killed_goes_on_identical_to_an_undisturbed_one(fleet):
    fleet.revive()
    api = _client(fleet.router)
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 40}
    undisturbed = list(api.chat.completions.create(**body, stream=True))

    raw = api.chat.completions.with_raw_response.create(**body, stream=True)
    chunks = []
    for i, chunk in enumerate(raw.parse()):
        chunks.append(chunk)
        if i == 6:
            fleet.kill(raw.headers["x-kvflock-replica"])

    def text(stream: list) -> str:
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert text(chunks) == text(undisturbed)
    assert [c.choices[0].delta.role for c in chunks].count("assistant") == 1
    assert chunks[-1].choices[0].finish_reason == undisturbed[-1].choices[0].finish_reason


def test_a_sampled_stream_whose_worker_is_killed_finishes_on_another(fleet):
    fleet.revive()
    api = _client(fleet.router)
    raw = api.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, temperature=0.9, seed=3, max_tokens=40,
                                                   extra_body={"ignore_eos": True}, stream=True, stream_options={"include_usage": True})
    chunks = []
    for i, chunk in enumerate(raw.parse()):
        chunks.append(chunk)
        if i == 8:
            fleet.kill(raw.headers["x-kvflock-replica"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40


def test_a_request_whose_worker_is_killed_before_answering_is_answered_whole_by_another(fleet):
    fleet.revive()
    api = _client(fleet.router)
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 64, "extra_body": {"ignore_eos": True}}
    expected = api.completions.create(**body).choices[0].text
    answers: list = []
    worker = threading.Thread(target=lambda: answers.append(api.completions.create(**body)))
    worker.start()

    def serving() -> str | None:
        busy = [url for url in fleet.workers if httpx.get(f"{url}/admin/drain").json()["in_flight"]]
        return busy[0] if busy else None

    victim = wait_for(serving, what="a worker to take the request")
    fleet.kill(victim)
    worker.join(timeout=120)
    assert answers and answers[0].choices[0].text == expected
