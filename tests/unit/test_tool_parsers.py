"""Tool calls read out of generated text in each model format, whole or while it streams: calls
become name + arguments JSON, the text before them content, malformed or cut-off calls content;
every reading of a growing text extends the one before, so streamed deltas add up."""

import json

import jsonschema
import pytest

from kvflock.worker.tool_parsers import (
    ToolCallReader,
    detect_format,
    parse,
    parse_forced_arguments,
    parse_forced_list,
)

HERMES = ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "q": {"s": "}{"}}}\n'
          '</tool_call>\n<tool_call>{"arguments": {}, "name": "now"}</tool_call>')
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "now", "parameters": {}}'
MISTRAL = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def names_and_arguments(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("fmt,text,content", [("hermes", HERMES, "Let me look."), ("llama3_json", LLAMA, ""),
                                              ("mistral", MISTRAL, "")])
def test_each_format_gives_its_calls_and_the_content_before_them(fmt, text, content):
    parsed = parse(fmt, text, finished=True)
    assert parsed.content == content
    assert names_and_arguments(parsed)[0][0] == "get_weather"
    assert names_and_arguments(parsed)[0][1]["city"] == "Paris"
    assert names_and_arguments(parsed)[1] == ("now", {})


def test_mistral_calls_are_read_without_their_special_token():
    parsed = parse("mistral", MISTRAL.removeprefix("[TOOL_CALLS]"), finished=True)
    assert [c.name for c in parsed.calls] == ["get_weather", "now"]


@pytest.mark.parametrize("fmt,text", [
    ("hermes", "Paris is sunny today."),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Par'),  # cut off by max_tokens
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>'),  # arguments not an object
    ("hermes", "<tool_call>not json</tool_call>"),
    ("llama3_json", '{"name": "Bob", "age": 3}'),  # a JSON answer, not a call
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"'),
    ("mistral", "[TOOL_CALLS] sorry"),
    ("mistral", "[1, 2, 3]"),
])
def test_malformed_or_cut_off_calls_are_content(fmt, text):
    parsed = parse(fmt, text, finished=True)
    assert parsed.calls == [] and parsed.content == text


@pytest.mark.parametrize("fmt,text", [("hermes", HERMES), ("llama3_json", LLAMA), ("mistral", MISTRAL),
                                      ("hermes", "Just text, with a < and a { in it.")])
def test_each_reading_of_a_growing_text_extends_the_one_before(fmt, text):
    before = parse(fmt, "", finished=False)
    for end in range(1, len(text) + 1):
        now = parse(fmt, text[:end], finished=end == len(text))
        assert now.content.startswith(before.content)
        for old, new in zip(before.calls, now.calls):
            assert old.name is None or old.name == new.name
            assert new.arguments.startswith(old.arguments)
        before = now
    assert [c.complete for c in before.calls] == [True] * len(before.calls)


def test_a_call_shows_its_name_only_once_its_arguments_begin():
    assert parse("hermes", '<tool_call>{"name": "get_weather"', finished=False).calls[0].name is None
    assert parse("hermes", '<tool_call>{"name": "get_weather", "arguments": {"ci', finished=False).calls[0].name == "get_weather"


def test_a_partly_written_marker_is_held_back_from_the_content():
    assert parse("hermes", "Sure <tool_ca", finished=False).content == "Sure "
    assert parse("hermes", "Sure <tool_ca", finished=True).content == "Sure <tool_ca"


def test_forced_outputs_are_read_as_the_json_they_are_constrained_to():
    listed = parse_forced_list('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', finished=True)
    assert names_and_arguments(listed) == [("get_weather", {"city": "Oslo"})]
    named = parse_forced_arguments("get_weather", ' {"city": "Oslo"}\n', finished=True)
    assert names_and_arguments(named) == [("get_weather", {"city": "Oslo"})]
    assert parse_forced_arguments("get_weather", "Oslo", finished=True).content == "Oslo"


def test_a_forced_choice_that_was_not_enforced_falls_back_to_the_models_format():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for reader in (ToolCallReader("hermes", required=True), ToolCallReader("hermes", named="get_weather")):
        assert names_and_arguments(reader.read(text, finished=True)) == [("get_weather", {"city": "Oslo"})]
    assert ToolCallReader("hermes", named="now").read(text, finished=True).calls == []


def test_parallel_tool_calls_false_keeps_the_first_call():
    assert [c.name for c in ToolCallReader("hermes", parallel=False).read(HERMES, True).calls] == ["get_weather"]


def test_the_forcing_schema_accepts_what_the_reader_reads_and_refuses_other_functions():
    required = ToolCallReader("llama3_json", required=True).forcing_schema([WEATHER, NOW])
    output = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    jsonschema.validate(json.loads(output), required)
    assert names_and_arguments(ToolCallReader("llama3_json", required=True).read(output, True)) == [
        ("get_weather", {"city": "Oslo"})]
    for refused in ([{"name": "delete_all", "parameters": {}}], [], [{"name": "get_weather", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(refused, required)
    one = ToolCallReader("hermes", required=True, parallel=False).forcing_schema([WEATHER, NOW])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "arguments": {}}] * 2, one)
    named = ToolCallReader("hermes", named="get_weather").forcing_schema([WEATHER, NOW])
    assert named == WEATHER["function"]["parameters"]
    assert ToolCallReader("hermes").forcing_schema([WEATHER]) is None


@pytest.mark.parametrize("template,special,expected", [
    ("{{ '<tool_call>' }}", {}, "hermes"),
    ("{{ '[TOOL_CALLS]' }}", {}, "mistral"),
    ("{{ x }}", {"[TOOL_CALLS]": 5}, "mistral"),
    ("<|start_header_id|>{{ '<|python_tag|>' }}", {}, "llama3_json"),
    (None, {}, "hermes"),
])
def test_the_format_is_detected_from_the_chat_template_and_special_tokens(template, special, expected):
    assert detect_format(template, special) == expected
