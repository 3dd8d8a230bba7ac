"""Structured outputs through the worker's OpenAI API (the `openai` client and httpx against a real
uvicorn server): OpenAI's response_format, vLLM's structured_outputs and guided_* fields, streaming
or not; outputs validate against their schemas and match their regexes and choices; bad grammars
and conflicting constraints are refused with a 400 that names the field."""

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import EngineConfig
from kvflock.worker.engine import LLMEngine
from kvflock.worker.server import WorkerState, create_app
from tests.server.conftest import MODEL, free_port, running_server

pytestmark = pytest.mark.slow

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}
_SMALL = {"type": "integer", "minimum": 0, "maximum": 99}
# Twenty schemas whose every string, array and number is bounded, so each answer completes well
# within max_tokens (a truncated answer would end with finish_reason "length", proving nothing).
SCHEMAS = [
    {"type": "object", "properties": {"name": _NAME, "age": _SMALL}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": _NAME, "country": _NAME}, "required": ["city", "country"]},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
     "required": ["sentiment"]},
    {"type": "array", "items": _NAME, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"title": _NAME, "tags": {"type": "array", "items": _NAME, "maxItems": 2}},
     "required": ["title", "tags"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": _SMALL, "name": _NAME},
                                               "required": ["id", "name"]}, "active": {"type": "boolean"}},
     "required": ["user", "active"]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                      "currency": {"enum": ["EUR", "USD", "GBP"]}}, "required": ["date", "currency"]},
    {"type": "object", "properties": {"steps": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"n": _SMALL, "text": _NAME}, "required": ["n", "text"]}}},
     "required": ["steps"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "reason": _NAME}, "required": ["answer"]},
    {"type": "object", "properties": {"point": {"type": "array", "items": _SMALL, "minItems": 2, "maxItems": 2}},
     "required": ["point"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                      "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["id", "qty"], "additionalProperties": False},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "name": _NAME, "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                   "required": ["zip"]}}, "required": ["name", "address"]}}, "required": ["person"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "code": {"enum": [200, 404, 500]}},
     "required": ["ok", "code"]},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}}, "required": ["colors"]},
    {"type": "object", "properties": {"temperature": {"type": "integer", "minimum": -50, "maximum": 60},
                                      "unit": {"const": "celsius"}}, "required": ["temperature", "unit"]},
    {"type": "object", "properties": {"rows": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": _SMALL, "maxItems": 2}}}, "required": ["rows"]},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "name": _NAME,
                                      "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
     "required": ["kind", "name", "legs"]},
    {"anyOf": [{"type": "object", "properties": {"ok": {"const": True}, "value": _SMALL}, "required": ["ok", "value"]},
               {"type": "object", "properties": {"ok": {"const": False}, "error": _NAME}, "required": ["ok", "error"]}]},
    {"$defs": {"item": {"type": "object", "properties": {"sku": _NAME, "count": _SMALL}, "required": ["sku", "count"]}},
     "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1,
                                                "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"language": {"enum": ["en", "fr", "de"]},
                                      "keywords": {"type": "array", "items": _NAME, "minItems": 1, "maxItems": 2},
                                      "rating": {"type": "number", "minimum": 0, "maximum": 5}},
     "required": ["language", "keywords"]},
]
QUESTION = "Reply with a short JSON answer about a cat called Tom."


@pytest.fixture(scope="module")
def url(smollm2) -> Iterator[str]:
    """One worker for the module (each test's requests are independent), its KV cache small."""
    engine = LLMEngine(EngineConfig(model="demo", max_model_len=512, max_num_seqs=20, kv_cache_memory_gib=0.25),
                       loaded=smollm2)
    state = WorkerState(served_model_name=MODEL)
    state.set_engine(AsyncEngine(engine))
    with running_server(create_app(state), free_port()) as served:
        yield served


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _messages(question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": question}]


async def _json_schema_answer(api: openai.AsyncOpenAI, i: int, schema: dict) -> tuple[str, str]:
    """Half through response_format streamed, half through vLLM's fields whole."""
    if i % 2:
        response = await api.chat.completions.create(
            model=MODEL, messages=_messages(), temperature=0, max_tokens=80,
            extra_body={"guided_json": schema} if i % 4 == 1 else {"structured_outputs": {"json": schema}})
        return response.choices[0].message.content, response.choices[0].finish_reason
    stream = await api.chat.completions.create(
        model=MODEL, messages=_messages(), temperature=0, max_tokens=80, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
    text, finish = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_twenty_json_schemas_give_valid_json_streaming_or_not(url):

    async def ask_all() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as api:
            return await asyncio.gather(*(_json_schema_answer(api, i, s) for i, s in enumerate(SCHEMAS)))

    for schema, (text, finish) in zip(SCHEMAS, asyncio.run(ask_all())):
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_output_parses_as_an_object(url):
    api = client(url)
    response = api.chat.completions.create(model=MODEL, messages=_messages("Describe Paris in JSON."), temperature=0,
                                           max_tokens=60, response_format={"type": "json_object"})
    choice = response.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # unbounded by any schema, it may run out of tokens; what it wrote is a JSON object's start
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_regex_and_choice_outputs_match_exactly(url):
    api = client(url)
    date = api.completions.create(model=MODEL, prompt="The date today is", temperature=0, max_tokens=12,
                                  extra_body={"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date.choices[0].text)
    city = api.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8,
                                  extra_body={"structured_outputs": {"regex": r" [A-Z][a-z]+\."}})
    assert re.fullmatch(r" [A-Z][a-z]+\.", city.choices[0].text) and city.choices[0].finish_reason == "stop"
    chunks = api.chat.completions.create(model=MODEL, messages=_messages("Is the sky blue?"), temperature=0,
                                         max_tokens=8, stream=True, extra_body={"guided_choice": ["yes", "no"]})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) in ("yes", "no")
    picked = api.chat.completions.create(model=MODEL, messages=_messages("Pick a color."), temperature=1.0, seed=5,
                                         n=3, max_tokens=8, extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert all(c.message.content in ("red", "blue") and c.finish_reason == "stop" for c in picked.choices)


def test_an_ebnf_grammar_constrains_the_output(url):
    api = client(url)
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    response = api.completions.create(model=MODEL, prompt="Is water wet?", temperature=0, max_tokens=12,
                                      extra_body={"guided_grammar": grammar})
    assert response.choices[0].text in ("The answer is yes.", "The answer is no.")
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path, body, param", [
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "objekt"}}}}, "response_format.json_schema.schema"),
    ("chat/completions", {"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}},
     "guided_json"),
    ("completions", {"guided_regex": "([a-z"}, "guided_regex"),
    ("completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ("completions", {"guided_grammar": "root ::= ("}, "guided_grammar"),
    ("chat/completions", {"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs.grammar"),
    ("completions", {"guided_json": "{not json"}, "guided_json"),
    ("completions", {"guided_choice": []}, "guided_choice"),
    ("chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("chat/completions", {"response_format": {"type": "structural_tag"}}, "response_format.type"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ("chat/completions", {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "response_format"),
    ("completions", {"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "guided_json"),
])
def test_bad_grammars_and_conflicting_constraints_are_refused_naming_the_field(url, path, body, param):
    request = {"model": MODEL, "max_tokens": 4, **body}
    request |= {"messages": _messages()} if path.startswith("chat") else {"prompt": "Hello"}
    response = httpx.post(f"{url}/v1/{path}", json=request, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param), error["message"]
    # The engine goes on serving.
    assert client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
