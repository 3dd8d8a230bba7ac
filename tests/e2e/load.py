"""A bounded, steady load for the e2e tests: a few client threads, each sending non-streaming
chat completions through the service URL one after another until stopped, recording which
replica answered each one (the router's `x-kvflock-replica` header) and every failure with
its error. The client never retries: a request the router could not place is a failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import openai

MODEL = "smollm2-135m-instruct"
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Answer:
    at: float  # time.monotonic() when it arrived
    replica: str  # "" when the answer did not say


@dataclass(frozen=True)
class Failure:
    at: float
    error: str


def client_for(url: str) -> openai.OpenAI:
    """An openai client for the service at `url`, with its own retries off."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, messages: Messages, max_tokens: int = 8) -> Answer:
    """One greedy, non-streaming chat completion; raises whatever the client raises."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,  # type: ignore[arg-type]
    )
    reply = raw.parse()
    if not reply.choices:
        raise AssertionError(f"an answer without choices: {reply}")
    return Answer(time.monotonic(), raw.headers.get("x-kvflock-replica", ""))


def short_question(n: int) -> Messages:
    """A prompt shorter than one routing block, so the router places it by load alone."""
    return [{"role": "user", "content": f"Name a color ({n})."}]


class SteadyLoad:
    """`clients` threads, each with one request outstanding at a time, for as long as the
    `with` block runs."""

    def __init__(self, url: str, clients: int = 4, prompt: Callable[[int], Messages] = short_question,
                 max_tokens: int = 8, send: Callable[[int], Answer] | None = None) -> None:
        """`send` replaces the chat request (the n-th request's call); it raises on a failure."""
        client = client_for(url)
        self.send = send or (lambda n: chat(client, prompt(n), max_tokens))
        self.answers: list[Answer] = []
        self.failures: list[Failure] = []
        self._count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"load-{i}", daemon=True) for i in range(clients)]

    def _next(self) -> int:
        with self._lock:
            self._count += 1
            return self._count

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.send(self._next())
            except Exception as exc:  # every failure counts, whatever its kind
                self.failures.append(Failure(time.monotonic(), repr(exc)))
            else:
                self.answers.append(answer)

    @property
    def done(self) -> int:
        return len(self.answers)

    def replicas_since(self, since: float) -> set[str]:
        return {a.replica for a in list(self.answers) if a.at >= since}

    def first_answer_from(self, replica: str, since: float) -> float | None:
        return next((a.at for a in list(self.answers) if a.at >= since and a.replica == replica), None)

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)
