"""Sampling: seeded requests reproduce, filters keep only allowed tokens, penalties and
logprobs follow the OpenAI/vLLM semantics, stop conditions end requests as asked."""

import torch

from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM
from kvflock.worker.sampler import apply_penalties, top_k_top_p_min_p
from kvflock.worker.sequence import Sequence
from tests.tiny_models import VOCAB

PROMPT = [5, 17, 42, 99, 3]


def test_seeded_sampling_reproduces_regardless_of_batch(tiny_engine):
    llm = LLM.from_engine(tiny_engine(max_model_len=128))
    params = SamplingParams(temperature=1.0, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batched = llm.generate([[1, 2, 3], PROMPT, [7] * 30], [others, params, others])[1].outputs[0].token_ids
    other_seed = llm.generate([PROMPT], params.model_copy(update={"seed": 99}))[0].outputs[0].token_ids

    assert alone == batched
    assert alone != other_seed


def test_n_completions_are_distinct_and_seeded(tiny_engine):
    llm = LLM.from_engine(tiny_engine(max_model_len=128))
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    first = [c.token_ids for c in llm.generate([PROMPT], params)[0].outputs]
    second = [c.token_ids for c in llm.generate([PROMPT], params)[0].outputs]
    assert first == second
    assert len({tuple(t) for t in first}) == 3


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_top_p_min_p(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [1, 3]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_k_top_p_min_p(probs.log(), torch.tensor([0]), torch.tensor([0.7]), torch.tensor([0.0]))
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [0, 1]


def test_min_p_drops_tokens_below_fraction_of_the_top():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    out = top_k_top_p_min_p(probs.log(), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.2]))
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [0, 1]


def test_sampled_tokens_stay_inside_the_filtered_set(tiny_engine):
    engine = tiny_engine(max_model_len=128)
    llm = LLM.from_engine(engine)
    params = SamplingParams(temperature=1.5, top_k=3, max_tokens=30, seed=3, logprobs=3, ignore_eos=True)
    [out] = llm.generate([PROMPT], params)
    for lp in out.outputs[0].logprobs:
        assert lp.token_id in lp.top, "a top_k=3 sample must be one of the 3 most likely tokens"


def test_logprobs_report_the_sampled_token_and_top_alternatives(tiny_engine):
    llm = LLM.from_engine(tiny_engine(max_model_len=128))
    [out] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, ignore_eos=True))
    lps = out.outputs[0].logprobs
    assert [lp.token_id for lp in lps] == out.outputs[0].token_ids
    for lp in lps:
        assert len(lp.top) == 2 and lp.logprob == max(lp.top.values()) <= 0.0


def _seq(prompt: list[int], output: list[int], **params) -> Sequence:
    seq = Sequence(0, "r", 0, prompt, SamplingParams(**params))
    for t in output:
        seq.append_token(t)
    return seq


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    out = apply_penalties(logits.clone(), [_seq([0], [1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    out = apply_penalties(logits, [_seq([3, 3], [1, 1, 2], frequency_penalty=0.5, presence_penalty=1.0)])
    assert out.tolist() == [[0.0, -2.0, -1.5, 0.0]]


def test_stop_token_ids_and_max_model_len_end_requests(tiny_engine):
    llm = LLM.from_engine(tiny_engine(max_model_len=32))
    greedy = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    [free] = llm.generate([PROMPT], greedy)
    assert free.outputs[0].finish_reason == "length"
    assert len(PROMPT) + len(free.outputs[0].token_ids) == 32

    stop_at = free.outputs[0].token_ids[3]
    [stopped] = llm.generate([PROMPT], greedy.model_copy(update={"stop_token_ids": [stop_at]}))
    first = free.outputs[0].token_ids.index(stop_at)
    assert stopped.outputs[0].token_ids == free.outputs[0].token_ids[: first + 1]
    assert (stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == ("stop", stop_at)


def test_min_tokens_holds_back_stop_tokens(tiny_engine):
    llm = LLM.from_engine(tiny_engine(max_model_len=64))
    [free] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    first = free.outputs[0].token_ids[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=4, stop_token_ids=[first])
    [out] = llm.generate([PROMPT], params)
    assert len(out.outputs[0].token_ids) >= 4
    assert first not in out.outputs[0].token_ids[:4]
    assert all(0 <= t < VOCAB for t in out.outputs[0].token_ids)
