"""A step's sequences cut into micro-batches for the pipeline stages (kvflock.worker.parallel.pipeline)."""

import pytest

from kvflock.worker.parallel.pipeline import split_micro_batches
from kvflock.worker.step_plan import ScheduledSequence, StepPlan


def plan(*tokens: int) -> StepPlan:
    """A plan of sequences computing `tokens` new tokens each (the splitter reads nothing else)."""
    return StepPlan([ScheduledSequence(None, 0, [0] * n, [], [1], True, n) for n in tokens])  # type: ignore[arg-type]


def tokens(parts: list[StepPlan]) -> list[list[int]]:
    return [[item.num_new_tokens for item in part.scheduled] for part in parts]


@pytest.mark.parametrize("new_tokens,stages,expected", [
    ((1, 1, 1, 1), 2, [[1, 1], [1, 1]]),
    ((1, 1, 1, 1, 1, 1, 1, 1), 4, [[1, 1], [1, 1], [1, 1], [1, 1]]),
    ((16, 1, 1, 1), 2, [[16], [1, 1, 1]]),
    ((1, 1, 100), 3, [[1], [1], [100]]),
    ((1, 2, 3), 1, [[1, 2, 3]]),
    ((5, 7), 4, [[2], [3], [3], [4]]),  # fewer sequences than stages: the largest chunks are halved
    ((9,), 4, [[2], [2], [2], [3]]),
    ((1, 1), 4, [[1], [1]]),  # decode tokens cannot be cut
])
def test_sequences_are_cut_into_contiguous_runs_of_about_equal_tokens(new_tokens, stages, expected):
    assert tokens(split_micro_batches(plan(*new_tokens), stages)) == expected


def test_the_runs_keep_the_plans_order_so_the_logits_rows_do():
    step = plan(3, 1, 4, 1, 5, 9, 2, 6)
    parts = split_micro_batches(step, 4)

    assert len(parts) == 4 and all(part.scheduled for part in parts)
    assert [item for part in parts for item in part.scheduled] == step.scheduled


def test_a_prompt_chunk_cut_into_pieces_covers_its_tokens_in_order_and_only_the_last_piece_samples():
    step = StepPlan([ScheduledSequence(None, 32, list(range(100, 109)), [], [4, 5, 6], True, 9, 2)])  # type: ignore[arg-type]
    pieces = [item for part in split_micro_batches(step, 4) for item in part.scheduled]

    assert [item.start for item in pieces] == [32, 34, 36, 38]
    assert [tok for item in pieces for tok in item.token_ids] == list(range(100, 109))
    assert [item.samples for item in pieces] == [False, False, False, True]
    assert all(item.block_ids == [4, 5, 6] and item.lora_slot == 2 for item in pieces)


def test_a_sequence_verifying_drafts_is_not_cut():
    step = StepPlan([ScheduledSequence(None, 5, [7], [8, 9, 10], [1], True, 4)])  # type: ignore[arg-type]
    assert tokens(split_micro_batches(step, 2)) == [[4]]
