"""A replica's rank grid (kvflock.shared.parallel_layout) and the engine settings that make it."""

import pytest
from pydantic import ValidationError

from kvflock.shared.parallel_layout import ParallelLayout, RankPlace
from kvflock.worker.config import EngineConfig


def test_tensor_ranks_are_innermost_then_context_then_stage():
    layout = ParallelLayout(tp=2, pp=3, cp=2)

    assert layout.world_size == 12
    assert [layout.place(r) for r in (0, 1, 2, 5, 11)] == [
        RankPlace(0, 0, 0), RankPlace(0, 0, 1), RankPlace(0, 1, 0), RankPlace(1, 0, 1), RankPlace(2, 1, 1)]
    assert all(layout.rank(layout.place(r)) == r for r in range(12))


def test_each_rank_belongs_to_one_group_per_dimension():
    layout = ParallelLayout(tp=2, pp=2, cp=2)

    assert layout.tp_group(5) == [4, 5]
    assert layout.cp_group(5) == [5, 7]
    assert layout.pp_group(5) == [1, 5]
    for groups in (layout.tp_group, layout.cp_group, layout.pp_group):
        for rank in range(layout.world_size):
            assert rank in groups(rank)
            assert all(groups(other) == groups(rank) for other in groups(rank))

@pytest.mark.parametrize("pp,layers,expected", [
    (1, 2, [range(0, 2)]),
    (2, 4, [range(0, 2), range(2, 4)]),
    (4, 4, [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]),
    (3, 8, [range(0, 3), range(3, 6), range(6, 8)]),
])
def test_stages_hold_contiguous_near_equal_runs_of_layers(pp, layers, expected):
    assert [ParallelLayout(pp=pp).stage_layers(s, layers) for s in range(pp)] == expected


def test_more_stages_than_layers_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="pipeline_parallel_size: 3 stages exceed the model's 2 layers"):
        ParallelLayout(pp=3).stage_layers(0, 2)


@pytest.mark.parametrize("tp,pp,cp,label", [(1, 1, 1, "TP1"), (2, 1, 1, "TP2"), (2, 2, 1, "TP2xPP2"),
                                            (1, 4, 1, "PP4"), (2, 2, 2, "TP2xCP2xPP2")])
def test_the_label_names_the_sizes_above_one(tp, pp, cp, label):
    assert ParallelLayout(tp, pp, cp).label == label


def test_engine_config_declares_the_layout():
    config = EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2)

    assert config.layout == ParallelLayout(tp=2, pp=2)
    assert config.world_size == 4


@pytest.mark.parametrize("field", ["pipeline_parallel_size", "context_parallel_size"])
def test_sizes_below_one_are_refused_naming_the_field(field):
    with pytest.raises(ValidationError, match=field):
        EngineConfig(**{field: 0})


def test_a_block_size_that_context_parallelism_does_not_divide_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="context_parallel_size: 4 does not divide block_size=2"):
        EngineConfig(context_parallel_size=4, block_size=2)
    assert EngineConfig(context_parallel_size=4, block_size=16).world_size == 4


@pytest.mark.parametrize("settings", [dict(enable_lora=True), dict(kv_offload_cpu_gib=1.0),
                                      dict(async_scheduling=True)])
@pytest.mark.parametrize("layout", [dict(pipeline_parallel_size=2), dict(context_parallel_size=2)])
def test_what_needs_one_rank_is_refused_with_pipeline_stages_or_context_ranks(settings, layout):
    with pytest.raises(ValidationError, match="parallel_size|several ranks"):
        EngineConfig(**layout, **settings)
