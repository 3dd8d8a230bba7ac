"""Tool calls read out of generated text, in the formats models are trained to write them:
Hermes / Qwen2.5 (`<tool_call>{"name", "arguments"}</tool_call>`), Llama 3.x (a bare JSON
`{"name", "parameters"}`, after an optional `<|python_tag|>`, several joined by `;`) and Mistral
(`[TOOL_CALLS][{"name", "arguments"}, ...]`), plus the plain JSON a request's forced tool choice
constrains the output to (an array of calls for `required`, the arguments object for a named
function).

A parser reads the whole text generated so far, whether or not it is finished, and says which
part is content and which calls it holds. While text is still coming, the content stops before
anything that may turn into a call, and a call shows its name once the name is complete and as
much of its arguments as is certain; so each reading extends the previous one and a stream can
send the difference. Once finished, text that holds no well-formed call is content, all of it.
Arguments are the JSON text the model wrote, not a re-serialization, so that streamed pieces add
up to the final value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

ToolCallFormat = Literal["hermes", "llama3_json", "mistral"]

_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
_MISTRAL_START = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str | None  # None while its name is still being written
    arguments: str  # the arguments' JSON text, or its certain prefix while being written
    complete: bool = False


@dataclass
class ParsedText:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCallReader:
    """How one chat request's output is read: in the model's `format`, or, when the request forces
    a call (`required`, or the `named` function), as the JSON the output is constrained to. While
    that constraint is not enforced, text that is not such JSON is read in the model's format."""

    format: ToolCallFormat
    required: bool = False
    named: str | None = None
    parallel: bool = True

    def read(self, text: str, finished: bool) -> ParsedText:
        if self.named is not None:
            parsed = parse_forced_arguments(self.named, text, finished)
            if finished and not parsed.calls:
                native = parse(self.format, text, finished)
                calls = [call for call in native.calls if call.name == self.named]
                parsed = ParsedText(native.content, calls) if calls else parsed
        elif self.required:
            parsed = parse_forced_list(text, finished)
            if finished and not parsed.calls:
                parsed = parse(self.format, text, finished)
        else:
            parsed = parse(self.format, text, finished)
        if not self.parallel and len(parsed.calls) > 1:
            parsed.calls = parsed.calls[:1]
        return parsed

    def forcing_schema(self, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The JSON schema a forced choice constrains the output to (None when the choice is the
        model's): the named function's parameters, or a non-empty array of calls to the offered
        functions (one call without parallel calls), the arguments under the model format's key."""
        parameters = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
        if self.named is not None:
            return parameters[self.named]
        if not self.required:
            return None
        key = arguments_key(self.format)
        calls = [{"type": "object", "properties": {"name": {"const": name}, key: schema},
                  "required": ["name", key], "additionalProperties": False} for name, schema in parameters.items()]
        return {"type": "array", "minItems": 1, **({} if self.parallel else {"maxItems": 1}), "items": {"anyOf": calls}}


def detect_format(chat_template: str | None, special_tokens: Iterable[str] = ()) -> ToolCallFormat:
    """The format a model writes calls in, read from its chat template (which shows the model its
    own past calls) and its special tokens; Hermes when nothing tells, the format most
    instruction-tuned models without a tool format of their own follow best."""
    template = chat_template or ""
    if _MISTRAL_START in template or _MISTRAL_START in special_tokens:
        return "mistral"
    if _PYTHON_TAG in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return "llama3_json"
    return "hermes"


def arguments_key(fmt: ToolCallFormat) -> str:
    return "parameters" if fmt == "llama3_json" else "arguments"


def parse(fmt: ToolCallFormat, text: str, finished: bool) -> ParsedText:
    """Content and calls in a model's own format."""
    if fmt == "hermes":
        return _with_marker(text, _HERMES_START, finished)
    if fmt == "mistral":
        # With special tokens skipped the marker is gone, and the call list starts the text.
        if text.lstrip().startswith("[{") or (not finished and text.strip() in ("", "[")):
            return _leading_calls(text, "", finished)
        return _with_marker(text, _MISTRAL_START, finished)
    stripped = text.lstrip()
    if stripped.startswith(_PYTHON_TAG):
        return _leading_calls(stripped[len(_PYTHON_TAG):], text, finished)
    if stripped.startswith("{") or (not finished and _PYTHON_TAG.startswith(stripped)):
        return _leading_calls(stripped, text, finished)
    return ParsedText(text)


def parse_forced_list(text: str, finished: bool) -> ParsedText:
    """`tool_choice: required`: the output is a JSON array of calls."""
    return _leading_calls(text, "", finished)


def parse_forced_arguments(name: str, text: str, finished: bool) -> ParsedText:
    """A named `tool_choice`: the output is that function's arguments object."""
    arguments = text.strip()
    if not finished:
        return ParsedText("", [ToolCall(name, arguments)] if arguments.startswith("{") else [])
    if isinstance(_loads(arguments), dict):
        return ParsedText("", [ToolCall(name, arguments, complete=True)])
    return ParsedText(text)


def _with_marker(text: str, marker: str, finished: bool) -> ParsedText:
    """Content up to `marker`, then calls."""
    at = text.find(marker)
    if at == -1:
        return ParsedText(text if finished else _without_marker_prefix(text, marker))
    return _leading_calls(text[at + len(marker):], text, finished, content=text[:at])


def _without_marker_prefix(text: str, marker: str) -> str:
    """`text` less a tail that may be the start of `marker`, which the next tokens could finish."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return text[:-size]
    return text


def _leading_calls(text: str, whole: str, finished: bool, content: str = "") -> ParsedText:
    """Calls written from the start of `text`; `whole` is the full output, all of it content
    when it turns out to hold no well-formed call. Text after the last call is dropped."""
    calls = _read_calls(text)
    if not finished:
        return ParsedText(content, calls)
    calls = [c for c in calls if c.complete]  # one cut off by max_tokens is no call
    return ParsedText(content, calls) if calls else ParsedText(whole or text)


# Between calls: whitespace, the separators of the list formats and Hermes' tags.
_BETWEEN = " \t\r\n,;[]"
_TAGS = (_HERMES_END, _HERMES_START)


def _read_calls(text: str) -> list[ToolCall]:
    """Call objects one after another, up to the first thing that is not one."""
    calls: list[ToolCall] = []
    at = 0
    while True:
        while at < len(text) and text[at] in _BETWEEN:
            at += 1
        tag = next((t for t in _TAGS if text.startswith(t, at)), None)
        if tag is not None:
            at += len(tag)
            continue
        if at == len(text) or text[at] != "{":
            return calls
        obj = _scan_object(text, at)
        call = _call_of(text, obj)
        if call is None:
            return calls
        calls.append(call)
        if obj.end is None:
            return calls
        at = obj.end


def _call_of(text: str, obj: _Object) -> ToolCall | None:
    """The call an object (complete or not) describes; None when it is not one. A call has a
    name and arguments; its name shows only once its arguments have begun, so that a JSON
    answer with a "name" field is not taken for a call before it is clear."""
    name_span = obj.keys.get("name")
    name = _loads(text[name_span[0]:name_span[1]].strip()) if name_span else None
    args_span = next((obj.keys[k] for k in ("arguments", "parameters") if k in obj.keys), None)
    arguments = text[args_span[0]:args_span[1]].strip() if args_span else ""
    if obj.end is None:
        return ToolCall(name if isinstance(name, str) and args_span else None, arguments)
    if isinstance(name, str) and isinstance(_loads(arguments), dict):
        return ToolCall(name, arguments, complete=True)
    return None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass
class _Object:
    keys: dict[str, tuple[int, int]]  # top-level key -> its value's span (to the text's end while open)
    end: int | None  # just past the closing brace; None while open


def _scan_object(text: str, start: int) -> _Object:
    """The top-level keys of the JSON object at `text[start]` ('{'), complete or not, by tracking
    nesting and strings; values are not checked here."""
    keys: dict[str, tuple[int, int]] = {}
    depth, in_string, escaped = 0, False, False
    string_start = 0
    last_key: str | None = None  # a top-level string that may be followed by ':'
    current: str | None = None  # the key whose value is being read
    value_start = 0
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 1 and current is None:
                    last_key = _loads(text[string_start:i + 1])
            continue
        if c == '"':
            in_string, string_start = True, i
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                if current is not None:
                    keys[current] = (value_start, i)
                return _Object(keys, i + 1)
        elif depth == 1 and c == ":" and current is None and isinstance(last_key, str):
            current, value_start, last_key = last_key, i + 1, None
        elif depth == 1 and c == "," and current is not None:
            keys[current] = (value_start, i)
            current = None
    if current is not None:
        keys[current] = (value_start, len(text))
    return _Object(keys, None)
