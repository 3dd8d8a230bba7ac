"""The request fields of OpenAI's and vLLM's completions and chat completions APIs that kvflock
knows, each either honoured or refused: a refused field sent with a value that asks for something
the worker does not do gets a 400 naming it, rather than an answer that silently ignores it.
Fields listed nowhere are ignored, as OpenAI ignores fields it does not know. The structured-output
fields (`response_format`, vLLM's `structured_outputs` and `guided_*`) are checked where they are
mapped onto a StructuredOutput, in kvflock.worker.protocol.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Endpoint = Literal["completions", "chat"]
BOTH: frozenset[Endpoint] = frozenset({"completions", "chat"})
CHAT: frozenset[Endpoint] = frozenset({"chat"})
COMPLETIONS: frozenset[Endpoint] = frozenset({"completions"})

# Honoured on both endpoints (each is a field of the request models in kvflock.worker.protocol).
HONOURED_BOTH = frozenset({
    "model", "n", "best_of", "temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stream", "stream_options",
    "logit_bias", "logprobs", "user", "min_tokens", "ignore_eos", "skip_special_tokens",
    "kvflock_continuation",  # the router's, when it continues a stream (kvflock.shared.stream_seam)
})
HONOURED: dict[Endpoint, frozenset[str]] = {
    "completions": HONOURED_BOTH | {"prompt", "echo"},
    "chat": HONOURED_BOTH | {
        "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
        "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
    },
}


@dataclass(frozen=True)
class Refused:
    name: str
    endpoints: frozenset[Endpoint]
    asks_nothing: Callable[[Any], bool]  # the values that ask for nothing kvflock lacks
    refused_example: Any  # a value that is refused (for the docs and the test that walks this list)
    why: str


def _is_none(value: Any) -> bool:
    return value is None


def _falsy(value: Any) -> bool:
    return not value


REFUSED: tuple[Refused, ...] = (
    Refused("use_beam_search", BOTH, _falsy, True, "beam search is not implemented; sample n choices instead"),
    Refused("length_penalty", BOTH, lambda v: v in (None, 1, 1.0), 0.5, "it applies to beam search only"),
    Refused("include_stop_str_in_output", BOTH, _falsy, True, "the stop string is always cut from the output"),
    Refused("prompt_logprobs", BOTH, _is_none, 1, "prompt logprobs are not computed"),
    Refused("allowed_token_ids", BOTH, _is_none, [1, 2], "use logit_bias to steer tokens"),
    Refused("bad_words", BOTH, _falsy, ["no"], "use logit_bias to ban tokens"),
    Refused("truncate_prompt_tokens", BOTH, _is_none, 8, "prompts are never truncated; shorten the prompt"),
    Refused("spaces_between_special_tokens", BOTH, lambda v: v in (None, True), False,
            "special tokens are always decoded as the tokenizer joins them"),
    Refused("priority", BOTH, lambda v: v in (None, 0), 1, "requests are scheduled first come, first served"),
    Refused("return_tokens_as_token_ids", BOTH, _falsy, True, "logprobs name tokens by their text"),
    Refused("suffix", COMPLETIONS, _falsy, "end", "insertion (fill in the middle) is not supported"),
    Refused("echo", CHAT, _falsy, True, "echo is a completions field"),
    Refused("add_special_tokens", CHAT, _falsy, True, "the chat template writes the special tokens"),
    Refused("functions", CHAT, _is_none, [{"name": "f"}], "use tools (the legacy functions field is not supported)"),
    Refused("function_call", CHAT, _is_none, "auto", "use tool_choice (the legacy function_call is not supported)"),
    Refused("audio", CHAT, _is_none, {"voice": "alloy", "format": "wav"}, "audio output is not supported"),
    Refused("modalities", CHAT, lambda v: v is None or list(v) == ["text"], ["text", "audio"],
            "only text output is supported"),
    Refused("prediction", CHAT, _is_none, {"type": "content", "content": "x"}, "predicted outputs are not supported"),
    Refused("web_search_options", CHAT, _is_none, {}, "web search is not supported"),
    Refused("reasoning_effort", CHAT, _is_none, "high",
            "pass the template's own switch in chat_template_kwargs (e.g. enable_thinking)"),
    Refused("store", CHAT, _falsy, True, "kvflock does not store completions"),
    Refused("documents", CHAT, _is_none, [{"title": "t", "text": "x"}], "put documents into the messages"),
)


def refuse_unsupported(body: Mapping[str, Any], endpoint: Endpoint) -> None:
    """A ValueError naming the first refused field of `body` that asks for something."""
    for field in REFUSED:
        if endpoint in field.endpoints and field.name in body and not field.asks_nothing(body[field.name]):
            raise ValueError(f"{field.name}: {body[field.name]!r} is not supported: {field.why}")
