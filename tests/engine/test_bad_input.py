"""Bad input is refused with a ValueError naming the field, and the engine keeps serving the
requests it already has."""

import pytest
from pydantic import ValidationError

from kvflock.worker.config import EngineConfig, SamplingParams

PROMPT = [5, 6, 7, 8]


@pytest.mark.parametrize(
    "field,value",
    [("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("n", 0), ("top_k", -1),
     ("min_p", 2.0), ("logprobs", -1)],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unknown_sampling_field_is_refused():
    with pytest.raises(ValidationError, match="top_q"):
        SamplingParams(top_q=0.5)


def test_bad_engine_config_names_the_field():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model="demo", block_size=12)


def test_pool_too_small_for_one_sequence_is_refused(tiny_engine):
    with pytest.raises(ValueError, match="num_kv_blocks"):
        tiny_engine(max_model_len=128, block_size=16, num_kv_blocks=4)


@pytest.mark.parametrize(
    "prompt,match",
    [([], "prompt: must not be empty"), ("", "prompt: must not be empty"), ([1] * 64, "max_model_len"),
     ([1, 256], "token ids"), ("text", "no tokenizer")],
)
def test_bad_prompt_fails_alone_and_the_engine_keeps_serving(tiny_engine, prompt, match):
    engine = tiny_engine(max_model_len=64)
    engine.add_request("good", PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    engine.step()

    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, SamplingParams())

    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert len(finished[0].outputs[0].token_ids) == 6
    assert engine.kv_manager.pool.num_free == engine.kv_manager.pool.capacity


def test_max_tokens_beyond_the_context_is_refused(tiny_engine):
    engine = tiny_engine(max_model_len=64)
    with pytest.raises(ValueError, match="max_tokens: 61 .* at most 60"):
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=61))


def test_duplicate_request_id_is_refused(tiny_engine):
    engine = tiny_engine(max_model_len=64)
    engine.add_request("r", PROMPT, SamplingParams())
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("r", PROMPT, SamplingParams())


def test_max_model_len_beyond_the_model_is_refused(tiny_engine):
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_engine(max_model_len=100_000)


def test_a_bad_prompt_in_a_batch_leaves_nothing_behind(tiny_engine):
    from kvflock.worker.llm import LLM

    llm = LLM.from_engine(tiny_engine(max_model_len=64))
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([PROMPT, []], SamplingParams())
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_manager.pool.num_free == llm.engine.kv_manager.pool.capacity
