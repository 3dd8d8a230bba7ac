"""What the client has received of a streamed generation, so that another replica can continue it
when the one serving it goes away (kvflock.shared.stream_seam says how router and worker talk).

The router reads the worker's SSE events one whole event at a time: it relays only complete
events, takes the token ids the worker put in each choice out of it, and gives every event the
`id` and `created` of the stream's first, so that a stream continued elsewhere reads as one. A
stream cut after its last choice finished needs no replica: the router ends it itself (the usage
chunk, when asked for, and `[DONE]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvflock.shared.stream_seam import CONTINUATION_FIELD, EXTENSION

_DONE = b"[DONE]"


def continuable(path: str, body: dict[str, Any]) -> bool:
    """Whether the request is a stream of one choice, which the router can continue elsewhere."""
    if body.get("stream") is not True or body.get("n", 1) != 1:
        return False
    if path == "/v1/completions":
        prompt = body.get("prompt")
        return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                           and all(isinstance(t, int) for t in prompt))
    return path == "/v1/chat/completions"


@dataclass
class StreamLedger:
    """One continuable stream: `relay` turns the worker's bytes into the client's, and the
    ledger keeps what the client has of its one choice."""

    body: dict[str, Any]  # the request as the client sent it
    token_ids: list[int] = field(default_factory=list)
    text_chars: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    failed: bool = False  # the worker sent an error event: continuing would not help
    done: bool = False  # `[DONE]` was relayed
    usage_sent: bool = False
    _envelope: dict[str, Any] | None = None  # id, object, created and model of the first chunk
    _partial: bytes = b""

    def relay(self, data: bytes) -> bytes:
        """The complete events in what arrived (after what was left of the last one), as the
        client is to get them."""
        self._partial += data
        *events, self._partial = self._partial.split(b"\n\n")
        return b"".join(self._event(e) + b"\n\n" for e in events if e.strip())

    def restart(self) -> None:
        """A new replica's stream follows: a partial event of the old one is dropped."""
        self._partial = b""

    def continuation(self) -> dict[str, Any]:
        """The request that continues the stream: the client's own, with where it stands; the
        client's own unchanged while it has no token yet."""
        if not self.token_ids:
            return self.body
        return {**self.body, CONTINUATION_FIELD: {"token_ids": self.token_ids, "text_chars": self.text_chars}}

    def ending(self) -> bytes:
        """What the client still needs of a stream whose choice has finished: its usage chunk
        (when asked for and not sent yet) and `[DONE]`."""
        if self.done:
            return b""
        out = b""
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True and not self.usage_sent:
            chunk = {**(self._envelope or {}), "choices": [], "usage": {
                "prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids),
                "total_tokens": self.prompt_tokens + len(self.token_ids)}}
            out += b"data: " + json.dumps(chunk).encode() + b"\n\n"
        self.done = True
        return out + b"data: " + _DONE + b"\n\n"

    def _event(self, event: bytes) -> bytes:
        payload = event.removeprefix(b"data: ")
        if payload == _DONE:
            self.done = True
            return event
        try:
            chunk = json.loads(payload)
        except ValueError:
            return event
        if not isinstance(chunk, dict) or "error" in chunk:
            self.failed = True
            return event
        if self._envelope is None:
            self._envelope = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
        chunk.update(id=self._envelope["id"], created=self._envelope["created"])
        for choice in chunk.get("choices") or ():
            seam = choice.pop(EXTENSION, None)
            if isinstance(seam, dict):
                self.token_ids += seam.get("token_ids", [])
                self.text_chars = seam.get("text_chars", self.text_chars)
                self.prompt_tokens = seam.get("prompt_tokens", self.prompt_tokens)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        if "usage" in chunk:
            self.usage_sent = True
        return b"data: " + json.dumps(chunk).encode()
