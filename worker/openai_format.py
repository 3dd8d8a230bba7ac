"""Engine outputs as OpenAI response objects: completions (with the prompt echoed when asked) and
chat completions (with the tool calls read from the text), whole or as streamed chunks, with their
logprobs and usage."""

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.engine import CompletionOutput
from kvflock.worker.sequence import TokenLogprobs
from kvflock.worker.tool_parsers import ParsedText, ToolCallReader


class Format:
    """Turns engine outputs into OpenAI response objects; subclasses pick the flavour."""

    object_full: str
    object_chunk: str

    def __init__(self, response_id: str, model: str, n: int, engine: AsyncEngine) -> None:
        self.id, self.model, self.n, self.engine = response_id, model, n, engine
        self.created = int(time.time())

    def choice_index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    def token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

    def envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_chunk if chunk else self.object_full,
                "created": self.created, "model": self.model, "choices": choices}

    def full_choice(self, index: int, completion: CompletionOutput) -> dict[str, Any]:
        raise NotImplementedError

    def resume(self, index: int, text: str) -> None:
        """Choice `index` continues a stream whose client has received `text` (another worker
        streamed it): what follows is sent as if this formatter had sent that."""

    def delta_choice(self, index: int, completion: CompletionOutput, text: str, first: bool,
                     token_range: tuple[int, int]) -> dict[str, Any] | None:
        """The chunk's choice for what `completion` gained; None when nothing of it can be sent yet."""
        raise NotImplementedError


class CompletionFormat(Format):
    object_full = object_chunk = "text_completion"

    def __init__(self, response_id: str, model: str, n: int, engine: AsyncEngine,
                 echo: list[str] | None = None) -> None:
        super().__init__(response_id, model, n, engine)
        self.echo = echo  # each prompt's text, put before its choices' text

    def _echoed(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo is not None else ""

    def logprobs(self, completion: CompletionOutput, start: int, end: int, text_offset: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        entries = _logprobs(completion, start, end)
        tokens = [self.token_text(e.token_id) for e in entries]
        offsets, at = [], text_offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top.items()} for e in entries],
                "text_offset": offsets}

    def full_choice(self, index: int, completion: CompletionOutput) -> dict[str, Any]:
        return {"index": index, "text": self._echoed(index) + completion.text, "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, 0, len(completion.token_ids), 0)}

    def delta_choice(self, index, completion, text, first, token_range):
        text_offset = len(completion.text) - len(text)
        if first:
            text = self._echoed(index) + text
        return {"index": index, "text": text, "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, *token_range, text_offset)}


@dataclass
class _ToolCallStream:
    """What one streamed choice has sent of its content and tool calls."""

    content: int = 0
    role_sent: bool = False
    call_ids: list[str] = field(default_factory=list)
    arguments: list[int] = field(default_factory=list)

    def delta(self, parsed: ParsedText) -> dict[str, Any]:
        """The content and call pieces of `parsed` not sent yet, in OpenAI's delta shape: a new call
        first with its index, id, type and name, then pieces of its arguments."""
        delta: dict[str, Any] = {}
        if not self.role_sent:
            delta["role"] = "assistant"
        # Whitespace alone is held back: it is often all that comes before a call.
        content = parsed.content if parsed.content.strip() else ""
        if len(content) > self.content and not self.call_ids:
            delta["content"] = content[self.content:]
            self.content = len(content)
        calls = []
        for i, call in enumerate(parsed.calls):
            if call.name is None:
                break  # calls are sent in order, each once its name is known
            if i == len(self.call_ids):
                self.call_ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self.arguments.append(len(call.arguments))
                calls.append({"index": i, "id": self.call_ids[i], "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}})
            elif len(call.arguments) > self.arguments[i]:
                calls.append({"index": i, "function": {"arguments": call.arguments[self.arguments[i]:]}})
                self.arguments[i] = len(call.arguments)
        if calls:
            delta["tool_calls"] = calls
        return delta


def _finish_reason(completion: CompletionOutput, parsed: ParsedText | None) -> str | None:
    if parsed is not None and parsed.calls and completion.finish_reason == "stop":
        return "tool_calls"
    return completion.finish_reason


class ChatFormat(Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def __init__(self, response_id: str, model: str, n: int, engine: AsyncEngine,
                 tools: ToolCallReader | None = None) -> None:
        super().__init__(response_id, model, n, engine)
        self.tools = tools
        self._streams: dict[int, _ToolCallStream] = {}

    def logprobs(self, completion: CompletionOutput, start: int, end: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [
            {**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top.items()]}
            for e in _logprobs(completion, start, end)
        ]}

    def full_choice(self, index: int, completion: CompletionOutput) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        parsed = self.tools.read(completion.text, finished=True) if self.tools is not None else None
        if parsed is not None and parsed.calls:
            message["content"] = parsed.content if parsed.content.strip() else None
            message["tool_calls"] = [
                {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}} for call in parsed.calls]
        return {"index": index, "message": message, "finish_reason": _finish_reason(completion, parsed),
                "logprobs": self.logprobs(completion, 0, len(completion.token_ids))}

    def resume(self, index: int, text: str) -> None:
        if self.tools is not None:
            stream = self._streams[index] = _ToolCallStream(role_sent=True)
            stream.delta(self.tools.read(text, finished=False))

    def delta_choice(self, index, completion, text, first, token_range):
        logprobs = self.logprobs(completion, *token_range)
        if self.tools is None:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": completion.finish_reason, "logprobs": logprobs}
        finished = completion.finish_reason is not None
        parsed = self.tools.read(completion.text, finished)
        stream = self._streams.setdefault(index, _ToolCallStream())
        delta = stream.delta(parsed)
        if not finished and not delta.keys() - {"role"}:
            return None  # everything new is held back until it is clear what it is
        stream.role_sent = True
        return {"index": index, "delta": delta, "finish_reason": _finish_reason(completion, parsed) if finished else None,
                "logprobs": logprobs}


def _logprobs(completion: CompletionOutput, start: int, end: int) -> list[TokenLogprobs]:
    """The logprobs of tokens [start, end). A continued stream has none for the tokens another
    worker generated: they are the first ones, and were sent with theirs."""
    assert completion.logprobs is not None
    skipped = len(completion.token_ids) - len(completion.logprobs)
    return completion.logprobs[max(start - skipped, 0):max(end - skipped, 0)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
