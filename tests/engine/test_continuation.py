"""LLMEngine.add_request(..., generated=...): a request continued from tokens another worker
generated goes on as the undisturbed request would: the same greedy tokens after the seam,
max_tokens and frequency penalties counted from the request's start, and its usage's prompt
the original prompt."""

import pytest

from kvflock.worker.config import SamplingParams
from kvflock.worker.engine import LLMEngine, RequestOutput

PROMPT = [5, 17, 42, 9, 33, 71, 2, 88, 14, 60, 3, 25]


def _finish(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams,
            generated: list[int] | None = None) -> RequestOutput:
    engine.add_request(request_id, prompt, params, generated=generated)
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                last = out
    assert last is not None and last.finished
    return last


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from kvflock.worker.config import EngineConfig

    return LLMEngine(EngineConfig(model=str(tiny_llama.source.path), max_model_len=128, num_kv_blocks=64),
                     loaded=tiny_llama)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5),
])
def test_a_continued_request_ends_as_the_undisturbed_one(engine, params):
    undisturbed = _finish(engine, "whole", PROMPT, params).outputs[0]
    continued = _finish(engine, "rest", PROMPT, params, generated=undisturbed.token_ids[:7])

    assert continued.outputs[0].token_ids == undisturbed.token_ids
    assert continued.outputs[0].finish_reason == undisturbed.finish_reason == "length"
    assert continued.prompt_token_ids == PROMPT


def test_a_continuation_that_already_reaches_max_tokens_is_refused(engine):
    with pytest.raises(ValueError, match=r"^kvflock_continuation.token_ids: 4 tokens already reach max_tokens=4"):
        engine.add_request("full", PROMPT, SamplingParams(max_tokens=4), generated=[1, 2, 3, 4])
