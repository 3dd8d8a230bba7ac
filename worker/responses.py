"""Running an API request's prompts on the engine and answering: whole (JSON) or streamed (SSE),
with the latency and token metrics observed on the way. A refusal by the engine becomes an
HTTP error before any byte of the answer is sent; a client that goes away aborts its requests.
A stream may carry its token ids for the router and continue one another worker started
(kvflock.shared.stream_seam)."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvflock.shared.stream_seam import EXTENSION
from kvflock.worker.api_errors import RETRY_AFTER_SECONDS, ApiError, error_from_value
from kvflock.worker.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from kvflock.worker.engine import RequestOutput
from kvflock.worker.metrics import WorkerMetrics
from kvflock.worker.openai_format import Format, usage
from kvflock.worker.structured_output import Grammar


@dataclass
class _Tracked:
    """One engine request's progress, for deltas and latency metrics."""

    prompt_index: int
    arrived: float
    last_token_at: float | None = None
    tokens_seen: dict[int, int] = field(default_factory=dict)
    text_seen: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Seam:
    """What the router asked of a stream: each chunk's choices carry their token ids
    (`report_tokens`), and the one choice continues from `generated` tokens of which the client
    has `text_chars` characters of text."""

    report_tokens: bool = False
    generated: list[int] | None = None
    text_chars: int = 0


async def start_requests(metrics: WorkerMetrics, engine: AsyncEngine, requests: list[tuple[Any, Any]],
                         grammar: Grammar | None = None, lora_name: str | None = None,
                         generated: list[int] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Submit every request and wait until each is accepted and has its first output, so that
    a refusal becomes an HTTP error before any byte of the answer is sent. `grammar`: the
    requests' structured output, compiled; `generated`: the tokens the one request continues from."""
    if len(requests) > engine.capacity:
        raise ApiError(400, f"prompt: {len(requests)} prompts exceed the {engine.capacity} this server holds at once "
                       "(max_num_seqs + max_queued_requests); send them in several requests", param="prompt")
    base = uuid.uuid4().hex
    generators = [engine.generate(f"{base}-{i}", prompt, params, grammar, lora_name, generated)
                  for i, (prompt, params) in enumerate(requests)]
    firsts: list[RequestOutput] = []
    try:
        engine.check_room(len(requests))
        for gen in generators:
            firsts.append(await gen.__anext__())
    except BaseException as exc:
        for gen in generators:
            await gen.aclose()
        if isinstance(exc, ValueError):
            raise error_from_value(exc) from exc
        if isinstance(exc, EngineOverloaded):
            raise ApiError(429, f"the server is overloaded ({exc}); retry later", "rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from exc
        if isinstance(exc, EngineDead):
            raise ApiError(503, str(exc), "service_unavailable") from exc
        raise
    for out in firsts:
        metrics.prompt_tokens.inc(len(out.prompt_token_ids))
    return _merge(generators, firsts)


async def _merge(generators: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the prompt's index."""
    for i, out in enumerate(firsts):
        yield i, out
    pending = {i for i, out in enumerate(firsts) if not out.finished}
    if len(pending) == 1:
        [i] = pending
        async for out in generators[i]:
            yield i, out
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in generators[i]:
                await merged.put((i, out))
        except Exception as exc:
            await merged.put((i, exc))
        await merged.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in pending]
    try:
        while pending:
            i, item = await merged.get()
            if item is None:
                pending.discard(i)
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for gen in generators:
            await gen.aclose()


def _observe(metrics: WorkerMetrics, tracked: _Tracked, out: RequestOutput, now: float) -> None:
    new_tokens = sum(len(c.token_ids) - tracked.tokens_seen.get(c.index, 0) for c in out.outputs)
    if new_tokens > 0:
        if tracked.last_token_at is None:
            metrics.ttft.observe(now - tracked.arrived)
        else:
            for _ in range(new_tokens):
                metrics.itl.observe((now - tracked.last_token_at) / new_tokens)
        tracked.last_token_at = now
        metrics.generation_tokens.inc(new_tokens)
    if out.finished:
        metrics.e2e.observe(now - tracked.arrived)
        for c in out.outputs:
            metrics.requests.labels(finish_reason=c.finish_reason or "unknown").inc()


async def respond(request: Request, metrics: WorkerMetrics, stream: AsyncIterator[tuple[int, RequestOutput]],
                  fmt: Format, streaming: bool, include_usage: bool, num_prompts: int, arrived: float,
                  seam: Seam = Seam()) -> Response:
    tracked = {i: _Tracked(i, arrived) for i in range(num_prompts)}

    if streaming:
        if seam.generated is not None:  # the client has these already: the stream goes on after them
            tracked[0].tokens_seen[0], tracked[0].text_seen[0] = len(seam.generated), seam.text_chars
        return StreamingResponse(_sse(metrics, stream, fmt, tracked, include_usage, seam),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    finals: dict[int, RequestOutput] = {}
    collector = asyncio.ensure_future(_collect(metrics, stream, tracked, finals))
    while not collector.done():
        await asyncio.wait([collector], timeout=0.5)
        if not collector.done() and await request.is_disconnected():
            collector.cancel()  # closing the stream aborts the requests and frees their blocks
            await asyncio.gather(collector, return_exceptions=True)
            return Response(status_code=499)
    collector.result()
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i in range(num_prompts):
        out = finals[i]
        prompt_tokens += len(out.prompt_token_ids)
        for c in out.outputs:
            if c.finish_reason == "error":
                raise ApiError(500, "the request failed inside the engine; see the worker's log", "internal_error")
            completion_tokens += len(c.token_ids)
            choices.append(fmt.full_choice(fmt.choice_index(i, c), c))
    body = fmt.envelope(False, sorted(choices, key=lambda c: c["index"]))
    body["usage"] = usage(prompt_tokens, completion_tokens)
    return JSONResponse(body)


async def _collect(metrics: WorkerMetrics, stream: AsyncIterator[tuple[int, RequestOutput]],
                   tracked: dict[int, _Tracked], finals: dict[int, RequestOutput]) -> None:
    try:
        async for i, out in stream:
            _observe(metrics, tracked[i], out, time.monotonic())
            tracked[i].tokens_seen = {c.index: len(c.token_ids) for c in out.outputs}
            finals[i] = out
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def _sse(metrics: WorkerMetrics, stream: AsyncIterator[tuple[int, RequestOutput]], fmt: Format,
               tracked: dict[int, _Tracked], include_usage: bool, seam: Seam) -> AsyncIterator[str]:
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[tuple[int, int], int] = {}
    continued = seam.generated is not None
    try:
        async for i, out in stream:
            if continued:
                fmt.resume(0, out.outputs[0].text[:seam.text_chars])
                continued = False
            _observe(metrics, tracked[i], out, time.monotonic())
            prompt_tokens[i] = len(out.prompt_token_ids)
            choices = []
            for c in out.outputs:
                t = tracked[i]
                seen_tokens, seen_text = t.tokens_seen.get(c.index, 0), t.text_seen.get(c.index, 0)
                if len(c.token_ids) == seen_tokens and c.finish_reason is None:
                    continue
                if c.finish_reason == "error":
                    error = {"message": "the request failed inside the engine", "type": "internal_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    continue
                first = c.index not in t.tokens_seen
                choice = fmt.delta_choice(fmt.choice_index(i, c), c, c.text[seen_text:], first,
                                          (seen_tokens, len(c.token_ids)))
                if choice is None:
                    continue  # held back: the next chunk covers these tokens too
                if seam.report_tokens:
                    choice[EXTENSION] = {"token_ids": c.token_ids[seen_tokens:], "text_chars": len(c.text),
                                         "prompt_tokens": prompt_tokens[i]}
                choices.append(choice)
                t.tokens_seen[c.index], t.text_seen[c.index] = len(c.token_ids), len(c.text)
                completion_tokens[(i, c.index)] = len(c.token_ids)
            if choices:
                yield f"data: {json.dumps(fmt.envelope(True, choices))}\n\n"
        if include_usage:
            usage_chunk = fmt.envelope(True, [])
            usage_chunk["usage"] = usage(sum(prompt_tokens.values()), sum(completion_tokens.values()))
            yield f"data: {json.dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
