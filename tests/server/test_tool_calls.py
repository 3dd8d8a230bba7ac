"""Tool calling through the worker's API, with the real `openai` client against a real uvicorn
server: SmolLM2 (135M) served with a Hermes-format chat template (`chat_template`) and shown three
past exchanges with a weather tool writes a call for the fourth city, which the worker turns into
OpenAI tool_calls, whole or streamed; the tool's answer then renders and is answered; a forced tool
choice is read too, and tool_choice none leaves the output as text.

The forced choices (`required`, a named function) also set a JSON-schema constraint on the request;
these tests pass without it being enforced (the few-shot model writes the call anyway), and
test_tool_choice_constraint... check the constraint itself."""

import json
from pathlib import Path

import openai
import pytest

from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import EngineConfig
from kvflock.worker.engine import LLMEngine
from kvflock.worker.server import WorkerState, create_app
from tests.server.conftest import MODEL, free_port, running_server

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).with_name("hermes_template.jinja")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def conversation(city: str = "Paris") -> list[dict]:
    """Three answered weather questions (call, result, answer), then one about `city`."""
    messages: list[dict] = []
    for i, past in enumerate(["London", "Berlin", "Madrid"]):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": past})}}
        messages += [{"role": "user", "content": f"What is the weather in {past}?"},
                     {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny"},
                     {"role": "assistant", "content": f"It is sunny in {past}."}]
    return messages + [{"role": "user", "content": f"What is the weather in {city}?"}]


@pytest.fixture(scope="module")
def api(smollm2):
    config = EngineConfig(model="demo", max_model_len=1024, chat_template=str(TEMPLATE))
    state = WorkerState(served_model_name=MODEL)
    state.set_engine(AsyncEngine(LLMEngine(config, loaded=smollm2)))
    with running_server(create_app(state), free_port()) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(api: openai.OpenAI, **kwargs):
    return api.chat.completions.create(model=MODEL, messages=conversation(), tools=[WEATHER], temperature=0,
                                       max_tokens=40, **kwargs)


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_written_call_becomes_openai_tool_calls(api, tool_choice):
    choice = ask(api, tool_choice=tool_choice).choices[0]
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content is None
    assert choice.finish_reason == "tool_calls"


def test_streamed_calls_come_as_openai_deltas_that_add_up_to_the_whole_answer(api):
    whole = ask(api).choices[0].message.tool_calls[0]
    chunks = [c for c in ask(api, stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not any(c.choices[0].delta.content for c in chunks)  # the call's text is not content
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_renders_and_the_model_answers_with_it(api):
    call = ask(api).choices[0].message.tool_calls[0]
    messages = conversation() + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "rainy"}]
    answer = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,
                                         max_tokens=20).choices[0]
    assert answer.message.tool_calls is None
    assert answer.finish_reason == "stop"
    assert "rainy" in answer.message.content and "Paris" in answer.message.content


def test_tool_choice_none_gives_no_tool_calls(api):
    choice = ask(api, tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason != "tool_calls"
    assert choice.message.content


def test_text_without_a_call_stays_content_streamed_or_not(api):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=16)
    streamed = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,
                                           max_tokens=16, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert whole.choices[0].message.tool_calls is None
    assert text == whole.choices[0].message.content and "Paris" in text


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_a_streamed_call_continued_mid_way_reads_as_the_undisturbed_one(api, tool_choice):
    """Another worker streamed the call's start (kvflock.shared.stream_seam); this one sends the
    rest: one call, its arguments whole, its grammar (with `required`) followed across the seam."""
    from tests.server.test_stream_continuation import continued, stream, tokens

    url = str(api.base_url).removesuffix("/").removesuffix("/v1")
    body = {"messages": conversation(), "tools": [WEATHER], "tool_choice": tool_choice, "temperature": 0,
            "max_tokens": 40}
    undisturbed = stream(url, "/v1/chat/completions", body)
    before, after = continued(url, "/v1/chat/completions", body, undisturbed, len(tokens(undisturbed)) // 2)

    def calls(chunks: list[dict]) -> list[tuple[str | None, str]]:
        found: dict[int, list] = {}
        for c in chunks:
            for call in c["choices"][0]["delta"].get("tool_calls") or []:
                entry = found.setdefault(call["index"], [None, ""])
                entry[0] = call["function"].get("name") or entry[0]
                entry[1] += call["function"].get("arguments", "")
        return [tuple(found[i]) for i in sorted(found)]

    assert calls(before + after) == calls(undisturbed) == [("get_weather", '{"city": "Paris"}')]
    assert after[-1]["choices"][0]["finish_reason"] == "tool_calls"
