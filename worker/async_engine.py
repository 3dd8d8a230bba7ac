"""An asyncio front over the engine for the server: one engine thread, per-request streams.

The engine and its tokenizer are touched only by the engine thread: requests to add or
abort arrive through a command queue and are applied between steps, and each step's outputs
are handed back to the event loop, into the queue of the request they belong to. A step
that raises fails the requests in it, never the loop. Other threads read only what is
published for them: the engine's stats after each step, and a tokenizer of their own (a fast
tokenizer used by two threads at once can fail with "Already borrowed").
"""

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from kvflock.worker.config import SamplingParams, StructuredOutput
from kvflock.worker.engine import EngineStats, LLMEngine, RequestOutput
from kvflock.worker.structured_output import Grammar

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """The queue of waiting requests is full; the client should retry later."""


class EngineDead(Exception):
    """The engine thread has stopped; the worker must be restarted."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    grammar: Grammar | None
    accepted: asyncio.Future
    outputs: asyncio.Queue
    lora_name: str | None = None
    generated: list[int] | None = None


@dataclass
class _Call:
    """Run `fn` on the engine thread between steps; its result or exception settles `done`."""

    fn: Callable[[], Any]
    done: asyncio.Future


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: int = 256) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._in_flight = 0
        self.last_step_at = time.monotonic()
        self.step_listeners: list[Callable[[list[RequestOutput]], None]] = []
        self.max_model_len = engine.max_model_len
        # The event loop's own copy, for chat templates and token texts.
        self.tokenizer: Any = copy.deepcopy(engine.tokenizer)
        self.chat_template = engine.chat_template
        self.stats: EngineStats = engine.stats()  # replaced by the engine thread, never changed in place
        self.lora_names: tuple[str, ...] = self._lora_names()  # replaced by the engine thread after each call
        self._thread = threading.Thread(target=self._run, name="kvflock-engine", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        """Requests accepted or waiting to be accepted and not yet finished."""
        return self._in_flight

    @property
    def capacity(self) -> int:
        """Requests that may be in flight at once: running ones plus the queue."""
        return self.engine.config.max_num_seqs + self.max_queued_requests

    def check_room(self, num_requests: int) -> None:
        """Raise EngineOverloaded unless `num_requests` more fit now, so that a request of several
        prompts is refused whole, before any of them is computed."""
        if self._in_flight + num_requests > self.capacity:
            raise EngineOverloaded(f"{self._in_flight} requests in flight; the queue is full")

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def compile_grammar(self, spec: StructuredOutput) -> Grammar:
        """A structured output compiled for the engine's tokenizer, in a thread of its own (the
        compiler is thread-safe): a ValueError naming the spec's field when it does not compile."""
        return await asyncio.to_thread(self.engine.grammars.compile, spec)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """fn's result, run on the engine thread between two steps (its exception is raised here)."""
        if not self.is_alive:
            raise EngineDead("the engine thread has stopped")
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._commands.put(_Call(fn, done))
        return await done

    def _lora_names(self) -> tuple[str, ...]:
        return () if self.engine.loras is None else tuple(self.engine.loras.names)

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, grammar: Grammar | None = None,
        lora_name: str | None = None, generated: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (cumulative) until it finishes. A ValueError from
        validation is raised before the first output; leaving early aborts the request.
        `grammar`: params.structured_output compiled by `compile_grammar`; `generated`: see
        LLMEngine.add_request."""
        if not self.is_alive:
            raise EngineDead("the engine thread has stopped")
        self.check_room(1)
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        outputs: asyncio.Queue = asyncio.Queue()
        self._in_flight += 1
        finished = False
        try:
            self._streams[request_id] = (outputs, loop)
            self._commands.put(_Add(request_id, prompt, params, grammar, accepted, outputs, lora_name,
                                    generated))
            await accepted
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._in_flight -= 1
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))

    def shutdown(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=10)

    # -- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            for command in self._next_commands():
                if command is None:
                    return
                self._apply(command)
            if self.engine.has_unfinished_requests():
                self._step()
            else:
                self.last_step_at = time.monotonic()  # idle, but turning
            self.stats = self.engine.stats()

    def _next_commands(self) -> list[_Add | _Abort | _Call | None]:
        """Whatever arrived since the last step; when idle, wait (briefly) for something."""
        commands = []
        try:
            if self.engine.has_unfinished_requests():
                commands.append(self._commands.get_nowait())
            else:
                commands.append(self._commands.get(timeout=1.0))
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            return commands

    def _apply(self, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            return
        if isinstance(command, _Call):
            loop = command.done.get_loop()
            try:
                result = command.fn()
            except Exception as exc:
                loop.call_soon_threadsafe(_settle, command.done, exc)
                return
            self.lora_names = self._lora_names()
            loop.call_soon_threadsafe(_settle_with, command.done, result)
            return
        loop = self._streams.get(command.request_id, (None, None))[1]
        if loop is None:
            return  # the client left before its request was applied
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.grammar,
                                    command.lora_name, command.generated)
        except Exception as exc:  # ValueError for bad input; anything else fails this request alone
            loop.call_soon_threadsafe(_settle, command.accepted, exc)
            return
        loop.call_soon_threadsafe(_settle, command.accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(exc)
            return
        self.last_step_at = time.monotonic()
        for listener in self.step_listeners:
            listener(outputs)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream[1].call_soon_threadsafe(stream[0].put_nowait, out)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in self.engine.unfinished_request_ids():
            self.engine.abort_request(request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream[1].call_soon_threadsafe(stream[0].put_nowait, RuntimeError(f"engine step failed: {exc}"))


def _settle_with(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _settle(future: asyncio.Future, error: Any) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
