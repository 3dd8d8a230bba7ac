"""What applications written for vLLM/OpenAI do, against `kvflock serve` (a real process, started
with --chat-template, --tool-call-parser and several --served-model-name) and against a
router in front of it: LangChain's ChatOpenAI with bind_tools and with_structured_output, instructor,
and the API's other fields, which the router passes through unchanged while counting constrained
requests.

A 135M model follows a tool format only when shown one: the tool tests give it three past calls.
Tests marked `structured_outputs` need the engine to enforce a JSON schema (grammar-constrained
decoding): without it they are skipped, since such a small model writes valid JSON for a schema
only when constrained to."""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import instructor
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from kvflock.router.app import RouterOptions, StaticDiscovery, create_app
from kvflock.router.discovery import parse_worker_flag
from kvflock.shared.metrics import parse_samples
from tests.polling import wait_for
from tests.server.conftest import free_port, running_server

pytestmark = pytest.mark.slow
TEMPLATE = Path(__file__).parent.parent / "server" / "hermes_template.jinja"
NAMES = ["smollm2", "gpt-4o-mini"]  # an application's own model name, served as an alias


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvflock.cli", "serve", "--model", "demo", "--served-model-name", *NAMES,
             "--chat-template", str(TEMPLATE), "--tool-call-parser", "hermes",
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
             "--max-model-len", "1024", "--enforce-eager"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _ready(url):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"kvflock serve did not become ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def router(worker) -> Iterator[str]:
    app = create_app(StaticDiscovery([parse_worker_flag(worker)]), options=RouterOptions(poll_interval=0.2))
    with running_server(app, free_port()) as url:
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, what="the router to be ready")
        yield url


@pytest.fixture(params=["worker", "router"])
def url(request) -> str:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def structured_outputs(worker) -> None:
    """Skips unless the engine enforces JSON schemas (the structured-output work)."""
    body = {"model": NAMES[0], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "response_format": {"type": "json_object"}}
    if httpx.post(f"{worker}/v1/chat/completions", json=body, timeout=120).status_code != 200:
        pytest.skip("the engine does not enforce structured outputs yet")


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "rainy"


def weather_history(city: str) -> list:
    """Three answered weather questions in LangChain's messages, then one about `city`."""
    messages: list = []
    for i, past in enumerate(["London", "Berlin", "Madrid"]):
        call = {"name": "get_weather", "args": {"city": past}, "id": f"call_{i}"}
        messages += [HumanMessage(f"What is the weather in {past}?"), AIMessage("", tool_calls=[call]),
                     ToolMessage("sunny", tool_call_id=f"call_{i}"), AIMessage(f"It is sunny in {past}.")]
    return messages + [HumanMessage(f"What is the weather in {city}?")]


def chat_model(url: str, name: str = NAMES[1]) -> ChatOpenAI:
    return ChatOpenAI(model=name, base_url=f"{url}/v1", api_key="unused", temperature=0, max_tokens=40,
                      max_retries=0, timeout=300)


def test_langchain_bind_tools_gets_the_call_and_answers_the_result(url):
    model = chat_model(url).bind_tools([get_weather])
    history = weather_history("Paris")
    call = model.invoke(history)
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [("get_weather", {"city": "Paris"})]
    answer = model.invoke(history + [call, ToolMessage("rainy", tool_call_id=call.tool_calls[0]["id"])])
    assert not answer.tool_calls and "rainy" in answer.content


def test_langchain_streams_the_call(url):
    chunks = list(chat_model(url).bind_tools([get_weather]).stream(weather_history("Paris")))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("get_weather", {"city": "Paris"})]


class Weather(BaseModel):
    city: str
    sunny: bool


@pytest.mark.usefixtures("structured_outputs")
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_fills_the_pydantic_model(url, method):
    model = chat_model(url).with_structured_output(Weather, method=method)
    answer = model.invoke("Paris is sunny today. Which city is it, and is it sunny?")
    assert isinstance(answer, Weather)


@pytest.mark.usefixtures("structured_outputs")
@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor_fills_the_pydantic_model(url, mode):
    client = instructor.from_openai(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                                  timeout=300), mode=mode)
    answer = client.chat.completions.create(
        model=NAMES[0], response_model=Weather, max_retries=0, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Paris is sunny today. Which city is it, and is it sunny?"}])
    assert isinstance(answer, Weather)


def test_the_router_passes_the_fields_through_and_answers_as_the_worker(worker, router):
    body = {"model": NAMES[1], "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "echo": True,
            "logit_bias": {"30": -100}, "best_of": 1, "chat_template_kwargs": {"ignored": "on completions"}}
    direct = httpx.post(f"{worker}/v1/completions", json=body, timeout=120).json()
    routed = httpx.post(f"{router}/v1/completions", json=body, timeout=120).json()
    assert routed["choices"][0]["text"] == direct["choices"][0]["text"]
    assert direct["choices"][0]["text"].startswith("The sky is")
    refused = httpx.post(f"{router}/v1/completions", json={**body, "suffix": "end"}, timeout=120)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "suffix"
    for path, payload in [("/tokenize", {"prompt": "Hello"}), ("/detokenize", {"tokens": [19556]})]:
        assert httpx.post(f"{router}{path}", json=payload).json() == httpx.post(f"{worker}{path}", json=payload).json()
    assert httpx.get(f"{router}/version").json() == httpx.get(f"{worker}/version").json()
    assert [m["id"] for m in httpx.get(f"{router}/v1/models").json()["data"]] == NAMES


def test_the_router_counts_constrained_requests(router):
    def counted() -> dict[str, float]:
        text = httpx.get(f"{router}/metrics").text
        return {kind: parse_samples("\n".join(line for line in text.splitlines() if f'kind="{kind}"' in line))
                .get("kvflock_router_constrained_requests_total", 0.0) for kind in ("tool_choice", "structured_output")}

    before = counted()
    messages = [{"role": "user", "content": "Hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in [{"tools": tools, "tool_choice": "required"},
                  {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
                  {"tools": tools, "tool_choice": "auto"}, {}]:
        httpx.post(f"{router}/v1/chat/completions", json={"model": NAMES[0], "messages": messages, "max_tokens": 2,
                                                          **extra}, timeout=120)
    after = counted()
    assert after["tool_choice"] - before["tool_choice"] == 2
    assert after["structured_output"] - before["structured_output"] == 1


def test_each_served_name_answers(worker):
    api = openai.OpenAI(base_url=f"{worker}/v1", api_key="unused", max_retries=0, timeout=120)
    for name in NAMES:
        assert api.completions.create(model=name, prompt="Once upon a time", max_tokens=2).model == name
