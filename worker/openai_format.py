"""Engine outputs as OpenAI response objects: completions and chat completions, whole or as
streamed chunks, with their logprobs and usage."""

import time
from typing import Any

from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.engine import CompletionOutput


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

    def delta_choice(self, index: int, completion: CompletionOutput, text: str, first: bool,
                     token_range: tuple[int, int]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(Format):
    object_full = object_chunk = "text_completion"

    def logprobs(self, completion: CompletionOutput, start: int, end: int, text_offset: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        entries = completion.logprobs[start:end]
        tokens = [self.token_text(e.token_id) for e in entries]
        offsets, at = [], text_offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top.items()} for e in entries],
                "text_offset": offsets}

    def full_choice(self, index: int, completion: CompletionOutput) -> dict[str, Any]:
        return {"index": index, "text": completion.text, "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, 0, len(completion.token_ids), 0)}

    def delta_choice(self, index, completion, text, first, token_range):
        text_offset = len(completion.text) - len(text)
        return {"index": index, "text": text, "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, *token_range, text_offset)}


class ChatFormat(Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def logprobs(self, completion: CompletionOutput, start: int, end: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [
            {**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top.items()]}
            for e in completion.logprobs[start:end]
        ]}

    def full_choice(self, index: int, completion: CompletionOutput) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, 0, len(completion.token_ids))}

    def delta_choice(self, index, completion, text, first, token_range):
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": completion.finish_reason,
                "logprobs": self.logprobs(completion, *token_range)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
