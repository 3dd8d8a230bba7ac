"""The offline Python API: `kvflock.LLM(model).generate(prompts, params)` and `.chat(...)`."""

import itertools
import sys
from collections.abc import Sequence
from typing import Any

from kvflock.shared.chat import render_chat
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine, RequestOutput

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Runs the engine to completion over a batch of prompts.

    `model` is a Hugging Face folder, a .gguf file (or a folder holding one), or "demo" for
    the bundled SmolLM2-135M-Instruct; keyword arguments are EngineConfig fields.
    """

    def __init__(self, model: str, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._ids = itertools.count()
        return llm

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        show_progress: bool = False,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in the prompts' order. A prompt is text or token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")

        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(request_id, prompt, p)
        except ValueError:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, show_progress)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        show_progress: bool = False,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or a batch of them, using the model's
        chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, show_progress)

    def apply_chat_template(self, conversation: list[Message]) -> list[int]:
        prompt = render_chat(self.tokenizer, conversation, chat_template=self.engine.chat_template)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _run(self, ids: list[str], show_progress: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if show_progress:
                        print(f"\r{len(done)}/{len(ids)} requests done", end="", file=sys.stderr, flush=True)
        if show_progress:
            print(file=sys.stderr)
        return [done[i] for i in ids]
