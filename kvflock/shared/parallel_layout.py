"""How one replica's ranks are laid out over its three parallel dimensions: tensor (a layer's
weights split), context (a prompt split by sequence) and pipeline (the layers split into
stages). Pure arithmetic, no torch: the worker starts and connects its ranks by it, the
operator checks a spec and shows the layout with it.

Ranks are numbered with the tensor-parallel rank innermost, then the context-parallel rank,
then the pipeline stage: rank = (stage * cp + cp_rank) * tp + tp_rank. A tensor-parallel group
(which all-reduces twice per layer) is then a run of adjacent ranks, which on a multi-GPU host
are the GPUs with the fastest links between them; stages exchange activations only once per
micro-batch and can sit furthest apart. Rank 0 is stage 0, tensor rank 0, context rank 0: the
engine's own process.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RankPlace:
    """Where one rank sits in the grid."""

    stage: int
    cp_rank: int
    tp_rank: int


@dataclass(frozen=True)
class ParallelLayout:
    """A replica of tp x cp x pp ranks."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for field, size in (("tensor_parallel_size", self.tp), ("pipeline_parallel_size", self.pp),
                            ("context_parallel_size", self.cp)):
            if size < 1:
                raise ValueError(f"{field}: {size} is below 1")

    @property
    def world_size(self) -> int:
        """Processes (and GPUs) of one replica."""
        return self.tp * self.pp * self.cp

    @property
    def label(self) -> str:
        """A short name for status lines: "TP2xPP2"; the sizes above 1 only, "TP1" for one rank."""
        parts = [f"{name}{size}" for name, size in (("TP", self.tp), ("CP", self.cp), ("PP", self.pp)) if size > 1]
        return "x".join(parts) or "TP1"

    def place(self, rank: int) -> RankPlace:
        """The place of `rank` (0 <= rank < world_size)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a replica of {self.world_size} ranks")
        return RankPlace(rank // (self.tp * self.cp), rank // self.tp % self.cp, rank % self.tp)

    def rank(self, place: RankPlace) -> int:
        return (place.stage * self.cp + place.cp_rank) * self.tp + place.tp_rank

    def tp_group(self, rank: int) -> list[int]:
        """The ranks that split one stage's layers with `rank` (same stage and context rank), in order."""
        p = self.place(rank)
        return [self.rank(RankPlace(p.stage, p.cp_rank, t)) for t in range(self.tp)]

    def cp_group(self, rank: int) -> list[int]:
        """The ranks that split the sequence with `rank` (same stage and tensor rank), in order."""
        p = self.place(rank)
        return [self.rank(RankPlace(p.stage, c, p.tp_rank)) for c in range(self.cp)]

    def pp_group(self, rank: int) -> list[int]:
        """The ranks that hold the other stages for `rank` (same tensor and context rank), stage by stage."""
        p = self.place(rank)
        return [self.rank(RankPlace(s, p.cp_rank, p.tp_rank)) for s in range(self.pp)]

    def stage_layers(self, stage: int, num_layers: int) -> range:
        """The decoder layers of `stage`: contiguous, as equal as can be, the earlier stages taking
        one more when they do not divide evenly (the first holds the embedding, the last the
        norm and LM head; those weigh about the same)."""
        check_pipeline_size(self.pp, num_layers)
        base, extra = divmod(num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (stage < extra))


def check_pipeline_size(pp: int, num_layers: int, field: str = "pipeline_parallel_size") -> None:
    """Refuse more stages than the model has layers (every stage holds at least one)."""
    problem = pipeline_split_problem(pp, num_layers, field)
    if problem is not None:
        raise ValueError(problem)


def pipeline_split_problem(pp: int, num_layers: int, field: str = "pipeline_parallel_size") -> str | None:
    """Why `pp` stages cannot split a model of `num_layers` layers (`field` names the setting), or None."""
    if pp > num_layers:
        return f"{field}: {pp} stages exceed the model's {num_layers} layers; use at most {num_layers}"
    return None
