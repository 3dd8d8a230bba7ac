"""Structured outputs in the engine: constrained sequences follow their grammars and end where the
grammar does, unconstrained ones in the same batch get exactly the tokens they get alone, async
scheduling and speculative decoding give the outputs of plain decoding, padded vocabulary ids are
never allowed, and the masks touch only the constrained rows."""

import json
import re

import jsonschema
import pytest
import torch

from kvflock.worker.config import EngineConfig, SamplingParams, StructuredOutput
from kvflock.worker.engine import LLMEngine, RequestOutput
from kvflock.worker.sequence import Sequence
from kvflock.worker.step_plan import ScheduledSequence
from kvflock.worker.structured_output import GrammarCompiler, StepMasks, apply_token_bitmask, fill_masks

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
CITY = re.compile(r"[A-Z][a-z]{2,8}")


@pytest.fixture(scope="module")
def compiler(smollm2) -> GrammarCompiler:
    return GrammarCompiler(smollm2.tokenizer, smollm2.config.vocab_size, (smollm2.tokenizer.eos_token_id,))


def _engine(smollm2, **settings) -> LLMEngine:
    return LLMEngine(EngineConfig(model="demo", max_model_len=512, kv_cache_memory_gib=0.25, **settings),
                     loaded=smollm2)


def _chat(engine: LLMEngine, question: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def _run(engine: LLMEngine, requests: list[tuple[str, str, SamplingParams]]) -> dict[str, RequestOutput]:
    for request_id, question, params in requests:
        engine.add_request(request_id, _chat(engine, question), params)
    done = {}
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step() if out.finished)
    return done


def _constrained(temperature: float = 0.0) -> list[tuple[str, str, SamplingParams]]:
    sampled = dict(temperature=temperature, seed=7) if temperature else dict(temperature=0.0)
    return [
        ("json", "Describe a person as JSON.", SamplingParams(max_tokens=30, **sampled,
                                                              structured_output=StructuredOutput(json_schema=PERSON))),
        ("regex", "Name a city.", SamplingParams(max_tokens=8, **sampled,
                                                 structured_output=StructuredOutput(regex=CITY.pattern))),
        ("choice", "Is the sky blue?", SamplingParams(max_tokens=8, n=2, **sampled,
                                                      structured_output=StructuredOutput(choice=["yes", "no"]))),
    ]


FREE = [
    ("free-greedy", "Name three colors.", SamplingParams(temperature=0.0, max_tokens=10)),
    ("free-seeded", "Tell me a story.", SamplingParams(temperature=0.9, seed=3, max_tokens=10)),
]


def _check_grammars(outputs: dict[str, RequestOutput]) -> None:
    jsonschema.validate(json.loads(outputs["json"].outputs[0].text), PERSON)
    assert CITY.fullmatch(outputs["regex"].outputs[0].text)
    assert {c.text for c in outputs["choice"].outputs} <= {"yes", "no"}
    for request_id in ("json", "choice"):
        assert all(c.finish_reason == "stop" for c in outputs[request_id].outputs), request_id


def test_constrained_outputs_follow_their_grammars_greedy_or_sampled(smollm2):
    _check_grammars(_run(_engine(smollm2), _constrained()))
    _check_grammars(_run(_engine(smollm2), _constrained(temperature=1.0)))


def test_free_requests_in_a_mixed_batch_get_the_tokens_they_get_alone(smollm2):
    alone = _run(_engine(smollm2), FREE)
    mixed = _run(_engine(smollm2), FREE + _constrained())
    for request_id, _, _ in FREE:
        assert mixed[request_id].outputs[0].token_ids == alone[request_id].outputs[0].token_ids, request_id
    _check_grammars(mixed)


def test_async_scheduling_gives_the_outputs_of_one_step_at_a_time(smollm2):
    workload = FREE + _constrained() + [(f"s-{r}", q, p) for r, q, p in _constrained(temperature=0.8)]
    overlapped = _engine(smollm2, async_scheduling=True)
    expected, got = _run(_engine(smollm2, async_scheduling=False), workload), _run(overlapped, workload)
    assert overlapped.async_scheduling
    for request_id in expected:
        assert [c.token_ids for c in got[request_id].outputs] == [c.token_ids for c in expected[request_id].outputs]
    _check_grammars(got)
    assert overlapped.kv_manager.pool.num_free == overlapped.kv_manager.pool.capacity


def test_speculative_decoding_checks_drafts_against_the_grammar(smollm2):
    # The prompt holds JSON close to the answer, so prompt lookup drafts tokens the grammar must vet.
    question = 'Repeat this JSON exactly: {"name": "Alice", "age": 30, "city": "Paris"}'
    params = SamplingParams(temperature=0.0, max_tokens=30, structured_output=StructuredOutput(json_schema=PERSON))
    plain = _run(_engine(smollm2), [("r", question, params)])["r"].outputs[0]
    spec = _engine(smollm2, speculative_method="ngram", num_speculative_tokens=4)
    drafted = _run(spec, [("r", question, params)])["r"].outputs[0]
    assert drafted.token_ids == plain.token_ids
    jsonschema.validate(json.loads(drafted.text), PERSON)
    assert spec.speculator.stats.num_drafted_tokens > 0


def test_a_complete_grammar_ends_its_sequence_even_when_eos_is_ignored(smollm2):
    engine = _engine(smollm2)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                            structured_output=StructuredOutput(choice=["Paris", "London"]))
    [out] = _run(engine, [("r", "What is the capital of France?", params)])["r"].outputs
    assert out.text in ("Paris", "London") and out.finish_reason == "stop"
    assert not set(out.token_ids) & set(engine.eos_token_ids)


def _allowed(masks: StepMasks, row: int) -> torch.Tensor:
    bits = (masks.bitmask[row].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(-1).bool()


def test_ids_past_the_tokenizer_vocabulary_are_never_allowed(smollm2):
    tokenizer_vocab = len(smollm2.tokenizer)
    compiler = GrammarCompiler(smollm2.tokenizer, tokenizer_vocab + 100, (smollm2.tokenizer.eos_token_id,))
    seq = Sequence(0, "r", 0, [1], SamplingParams())
    seq.grammar = compiler.compile(StructuredOutput(regex="(.|\n)*")).matcher()
    masks = fill_masks([ScheduledSequence.of(seq, 1, [1])], tokenizer_vocab + 100)
    allowed = _allowed(masks, 0)
    assert allowed[:tokenizer_vocab].sum() > tokenizer_vocab // 2
    assert not allowed[tokenizer_vocab:].any()


def test_masks_change_only_the_constrained_rows():
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # tokens 0 and 2
    bitmask[0, 2] = 1 << 1  # token 65
    masked = apply_token_bitmask(logits, StepMasks([1], bitmask))
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert torch.isfinite(masked[1]).nonzero().view(-1).tolist() == [0, 2, 65]
    assert torch.equal(masked[1, [0, 2, 65]], logits[1, [0, 2, 65]])


def test_grammars_are_compiled_once_per_spec_and_the_cache_is_bounded(smollm2):
    compiler = GrammarCompiler(smollm2.tokenizer, 49152, (2,), cache_size=2)
    first = compiler.compile(StructuredOutput(json_schema=PERSON))
    assert compiler.compile(StructuredOutput(json_schema=json.loads(json.dumps(PERSON)))) is first
    compiler.compile(StructuredOutput(regex="a+"))
    compiler.compile(StructuredOutput(regex="b+"))
    assert compiler.compile(StructuredOutput(json_schema=PERSON)) is not first


@pytest.mark.parametrize("spec, field", [
    (StructuredOutput(json_schema={"type": "objekt"}), "json_schema"),
    (StructuredOutput(json_schema={"$ref": "#/nowhere"}), "json_schema"),
    (StructuredOutput(regex="([a-z"), "regex"),
    (StructuredOutput(grammar="root ::= ("), "grammar"),
    (StructuredOutput(grammar="start: undefined_rule"), "grammar"),
])
def test_compile_errors_name_the_field(compiler, spec, field):
    with pytest.raises(ValueError, match=f"^{field}: does not compile"):
        compiler.compile(spec)
