"""Text-level behaviour on the real demo model: chat answers, stop strings, detokenization."""

import pytest

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2) -> LLM:
    return LLM.from_engine(LLMEngine(EngineConfig(model="demo", max_model_len=512), loaded=smollm2))


def test_chat_answers_paris(llm):
    [out] = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert "<|im_end|>" not in out.outputs[0].text


def test_stop_string_ends_the_answer_before_it(llm):
    [out] = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32, stop=["Paris"]))
    completion = out.outputs[0]
    assert completion.text.endswith("is ") and "Paris" not in completion.text
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "Paris")


def test_text_prompt_is_tokenized_without_special_tokens(llm):
    [out] = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=4))
    assert out.prompt == "The capital of France is"
    assert out.prompt_token_ids == llm.tokenizer.encode("The capital of France is", add_special_tokens=False)
    assert out.outputs[0].finish_reason == "length"
