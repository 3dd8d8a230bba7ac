"""Access control shared by the worker and the router: who may call /v1/* and /admin/*.

Both apps wrap themselves in `AccessControl`, so the rules live in one place: the kubelet's
probes (/health, /ready) and /metrics stay open, everything else needs `Authorization: Bearer <key>`
with an accepted key (as the OpenAI client sends it), and /admin/* needs the operator's token (with
API keys on and no admin token, /admin/* is closed: it can take a worker out of service); so do
the LoRA adapter endpoints under /v1 (ADMIN_V1_PATHS), which change what a worker serves. Keys are
compared in constant time over every accepted key, and never logged or echoed: a refusal says what was wrong, not what was sent. Optional per-key limits
(requests and tokens per minute) answer 429 with Retry-After, before any GPU work starts.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the operator imports bearer_header without starlette installed
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_FILE_ENV = "KVFLOCK_API_KEY_FILE"
ADMIN_TOKEN_FILE_ENV = "KVFLOCK_ADMIN_TOKEN_FILE"
INTERNAL_TOKEN_FILE_ENV = "KVFLOCK_INTERNAL_TOKEN_FILE"


def read_keys(path: str | Path) -> tuple[bytes, ...]:
    """The keys in `path`: one per line; blank lines and `#` comments are skipped, so a key file
    can be annotated and rotated by adding the new key before removing the old one."""
    path = Path(path)
    keys = tuple(line.strip().encode() for line in path.read_text().splitlines()
                 if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ValueError(f"{path}: holds no key; write one key per line")
    return keys


def keys_from(flag: str | None, env: str) -> tuple[bytes, ...]:
    """Keys from the file a flag names, else from the file the environment variable names,
    else none (that check is off). Files rather than values keep keys out of `ps` and Pod specs."""
    path = flag or os.environ.get(env)
    return read_keys(path) if path else ()


@dataclass(frozen=True)
class AccessPolicy:
    """What each protected path accepts. An empty tuple leaves that path open, as before auth
    existed, so a server started without key files behaves as it always did."""

    api_keys: tuple[bytes, ...] = ()
    admin_tokens: tuple[bytes, ...] = ()
    requests_per_minute: int | None = None  # per API key; None: no limit
    tokens_per_minute: int | None = None  # per API key, estimated on arrival (`requested_tokens`)

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 (or unset for no limit), got {value}")
        if set(self.api_keys) & set(self.admin_tokens):
            raise ValueError("admin token: must differ from every API key, so that no user key opens /admin/*")

    def required(self, path: str) -> tuple[tuple[bytes, ...], str]:
        """The keys that `path` accepts (empty: open) and what to call them in a refusal.

        Fail closed: with API keys on, every path but the probes and /metrics needs a key
        (/docs, /openapi.json, /version and any path added later too), and /admin/* needs an
        admin token, refusing everyone while none is configured."""
        if path in OPEN_PATHS:
            return (), ""
        if path == "/admin" or path.startswith("/admin/") or path in ADMIN_V1_PATHS:
            return (self.admin_tokens or (CLOSED if self.api_keys else ())), "admin token"
        return self.api_keys, "API key"


# Open whatever the keys: the kubelet's probes, and /metrics, which holds no request content and
# which Prometheus scrapes (the chart's NetworkPolicy says from where).
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
# vLLM's paths for loading and unloading LoRA adapters at run time: the operator's, not a user's.
ADMIN_V1_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
# No presented key equals this (keys are stripped, non-empty lines), so a path that accepts only it is closed.
CLOSED = (b" closed ",)


def bearer_header(key: bytes) -> str:
    """The Authorization header value that presents `key`."""
    return f"Bearer {key.decode()}"


def _presented(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credential = value.partition(b" ")
            return credential.strip() if scheme.lower() == b"bearer" and credential.strip() else None
    return None


def _matches(presented: bytes, accepted: tuple[bytes, ...]) -> bool:
    """Compares with every accepted key, without stopping at a match, so that the time taken
    tells nothing about which key (or how much of one) was right."""
    found = False
    for key in accepted:
        found |= hmac.compare_digest(presented, key)
    return found


def requested_tokens(body: bytes) -> int:
    """What a request may cost, judged before it runs: its prompt (a token-id list counts its
    length, text about four characters a token) plus the output it asks for at most. Limiting
    on arrival, as hosted OpenAI-compatible APIs do, refuses a request before it takes GPU time."""
    try:
        request = json.loads(body)
    except ValueError:
        return 0
    if not isinstance(request, dict):
        return 0

    def prompt_tokens(value: object) -> int:
        if isinstance(value, str):
            return math.ceil(len(value) / 4)
        if isinstance(value, list):
            return len(value) if all(isinstance(v, int) for v in value) else sum(prompt_tokens(v) for v in value)
        if isinstance(value, dict):
            return prompt_tokens(value.get("content")) + prompt_tokens(value.get("text"))
        return 0

    output = request.get("max_completion_tokens") or request.get("max_tokens") or 0
    return prompt_tokens(request.get("prompt")) + prompt_tokens(request.get("messages")) + \
        (output if isinstance(output, int) else 0)


@dataclass
class _Window:
    """One key's requests and tokens over the last minute, oldest first."""

    events: deque[tuple[float, int]] = field(default_factory=deque)
    tokens: int = 0


class KeyLimiter:
    """Sliding one-minute windows per key. Keys are held by index, so no key is kept twice."""

    WINDOW_SECONDS = 60.0

    def __init__(self, policy: AccessPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm, self.clock = policy.requests_per_minute, policy.tokens_per_minute, clock
        self._windows: dict[int, _Window] = {}

    def admit(self, key_index: int, tokens: int) -> float | None:
        """Charge the request and return None, or return the seconds until it would fit."""
        now = self.clock()
        window = self._windows.setdefault(key_index, _Window())
        while window.events and window.events[0][0] <= now - self.WINDOW_SECONDS:
            window.tokens -= window.events.popleft()[1]
        waits = []
        if self.rpm is not None and len(window.events) >= self.rpm:
            waits.append(window.events[len(window.events) - self.rpm][0])
        if self.tpm is not None and window.tokens + tokens > self.tpm and window.events:
            freed, needed = 0, window.tokens + tokens - self.tpm
            for at, spent in window.events:
                freed += spent
                if freed >= needed:
                    waits.append(at)
                    break
            else:
                waits.append(window.events[-1][0])
        if waits:
            return max(waits) + self.WINDOW_SECONDS - now
        window.events.append((now, tokens))
        window.tokens += tokens
        return None


class AccessControl:
    """ASGI middleware enforcing an `AccessPolicy`; a refusal is a 401 with an OpenAI-style
    `authentication_error` body, which the OpenAI client raises as `AuthenticationError`, and
    a request over its key's limit a 429 `rate_limit_error` with Retry-After."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy
        limited = policy.api_keys and (policy.requests_per_minute or policy.tokens_per_minute)
        self.limiter = KeyLimiter(policy) if limited else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        accepted, what = self.policy.required(scope["path"])
        if accepted is CLOSED:
            return await _refuse(send, f"{scope['path']} is closed: this server has API keys but no {what}; "
                                       "start it with --admin-token-file", 403, "permission_error", [])
        if accepted:
            presented = _presented(scope)
            if presented is None:
                return await _refuse(send, f"missing {what}: send the header `Authorization: Bearer <key>`")
            if not _matches(presented, accepted):
                return await _refuse(send, f"invalid {what}: the key sent is not accepted here")
            if self.limiter is not None and accepted is self.policy.api_keys and scope["method"] == "POST":
                return await self._limited(scope, receive, send, self.policy.api_keys.index(presented))
        await self.app(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, key_index: int) -> None:
        """Read the body to estimate its tokens, admit or refuse, then hand the app the body."""
        assert self.limiter is not None
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        wait = self.limiter.admit(key_index, requested_tokens(body) if self.limiter.tpm is not None else 0)
        if wait is not None:
            retry_after = max(1, math.ceil(wait))
            return await _refuse(send, f"this API key is over its limit of {self._limits_text()}; "
                                       f"retry after {retry_after} s", 429, "rate_limit_error",
                                 [(b"retry-after", str(retry_after).encode())])
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _limits_text(self) -> str:
        limits = [f"{self.policy.requests_per_minute} requests" if self.policy.requests_per_minute else "",
                  f"{self.policy.tokens_per_minute} tokens" if self.policy.tokens_per_minute else ""]
        return " and ".join(limit for limit in limits if limit) + " per minute"


async def _refuse(send: Send, message: str, status: int = 401, type_: str = "authentication_error",
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": None}}).encode()
    extra = headers if headers is not None else [(b"www-authenticate", b"Bearer")]
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})
