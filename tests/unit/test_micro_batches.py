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
    ((5, 7), 4, [[5], [7]]),
    ((9,), 4, [[9]]),
    ((1, 2, 3), 1, [[1, 2, 3]]),
])
def test_sequences_are_cut_into_contiguous_runs_of_about_equal_tokens(new_tokens, stages, expected):
    assert tokens(split_micro_batches(plan(*new_tokens), stages)) == expected


def test_the_runs_keep_the_plans_order_so_the_logits_rows_do():
    step = plan(3, 1, 4, 1, 5, 9, 2, 6)
    parts = split_micro_batches(step, 4)

    assert len(parts) == 4 and all(part.scheduled for part in parts)
    assert [item for part in parts for item in part.scheduled] == step.scheduled
