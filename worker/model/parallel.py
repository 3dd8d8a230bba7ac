"""Megatron-style tensor-parallel layers: each rank holds a slice of every large weight and
the layers exchange activations at two points per block (after attention's output projection
and after the MLP's down projection) plus once for the embedding and once for the logits.

Column-parallel layers split output features (no communication); row-parallel layers split
input features and sum the partial products with one all-reduce; the vocabulary is split
across ranks for both the embedding and the LM head. Every layer records which slice of the
full checkpoint tensor it holds (`shards`), so the loader reads each rank's part by name.
With one rank every layer is a plain matmul or lookup and no process group exists.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kvflock.shared.model_files import ModelShape, tp_split_problem
from kvflock.worker.config import ModelConfig


class Shard(NamedTuple):
    """The slice [start, stop) along `dim` of a checkpoint tensor whose size there is `full`
    that one rank's parameter holds (at its beginning: a padded parameter may be longer)."""

    dim: int
    start: int
    stop: int
    full: int


@dataclass(frozen=True)
class TPGroup:
    """One process's place in its tensor-parallel group (the ranks of one pipeline stage).

    `device_pg` carries activations (NCCL on GPU, gloo on CPU). It is a c10d backend owned by
    this replica, not the process-wide default group, so several replicas (and single-rank
    models) can live in one process. The per-step batch travels separately, over the
    replica's gloo group (kvflock.worker.tp).
    """

    rank: int = 0
    world_size: int = 1
    device_pg: Any = None

    @property
    def distributed(self) -> bool:
        """True when the layers communicate, even with a single rank (the NCCL path's test)."""
        return self.device_pg is not None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        if self.distributed:
            self.device_pg.allreduce([x]).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `x` concatenated along the last dim on rank 0; None on the others."""
        if not self.distributed:
            return x
        opts = dist.GatherOptions()
        opts.rootRank = 0
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else []
        self.device_pg.gather([parts] if self.rank == 0 else [], [x.contiguous()], opts).wait()
        return torch.cat(parts, dim=-1) if self.rank == 0 else None


SINGLE_RANK = TPGroup()


def check_tp_size(cfg: ModelConfig, tp: int, expert_parallel: bool = False) -> None:
    """Refuse a tensor-parallel size that cannot split this model's heads, MLP and experts evenly
    (each expert's features, or with `expert_parallel` the experts themselves)."""
    problem = tp_split_problem(ModelShape(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.num_layers), tp)
    if problem is not None:
        raise ValueError(problem)
    moe = cfg.moe
    if moe is None:
        return
    if expert_parallel and moe.num_experts % tp:
        raise ValueError(f"tensor_parallel_size: {tp} does not divide the model's {moe.num_experts} experts, which "
                         "expert_parallel spreads whole over the ranks; use a divisor of it or expert_parallel=false")
    if not expert_parallel and moe.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size: {tp} does not divide the experts' intermediate size "
                         f"{moe.intermediate_size}; use a divisor of it or expert_parallel=true")
    if moe.shared_intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size: {tp} does not divide the shared expert's intermediate size "
                         f"{moe.shared_intermediate_size}")


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads each rank keeps: a share of them, or one (replicated) when tp > num_kv_heads."""
    return max(1, cfg.num_kv_heads // tp)


@dataclass(frozen=True)
class HeadSplit:
    """The query and KV heads of one rank, as ranges of the model's heads."""

    q_start: int
    num_q: int
    kv_start: int
    num_kv: int

    @classmethod
    def of(cls, cfg: ModelConfig, group: TPGroup) -> "HeadSplit":
        num_q = cfg.num_heads // group.world_size
        q_start = group.rank * num_q
        # The KV head that serves query head h is h // (num_heads // num_kv_heads); when KV
        # heads are replicated, several ranks keep the same one.
        kv_start = q_start * cfg.num_kv_heads // cfg.num_heads
        return cls(q_start, num_q, kv_start, kv_heads_per_rank(cfg, group.world_size))


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix (or stack of them), stored with the input features outermost."""
    return weight.transpose(-2, -1).contiguous().transpose(-2, -1)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b for this rank's output features [start, start + size) of the layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool, start: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, in_features))
        self.bias = nn.Parameter(torch.empty(size)) if bias else None
        rows = Shard(0, start, start + size, out_features)
        self.shards = {"weight": rows, "bias": rows}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, plus b once: this rank holds input features
    [start, start + size); the bias is replicated and added after the all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TPGroup, start: int, size: int) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.shards = {"weight": Shard(1, start, start + size, in_features)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.group.distributed:
            return F.linear(x, self.weight, self.bias)
        y = self.group.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows are split across ranks in equal, padded shares: each rank
    looks up the tokens in its share, zeros the others, and an all-reduce sums the shares."""

    def __init__(self, vocab_size: int, hidden_size: int, group: TPGroup) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // group.world_size)
        self.start = min(group.rank * self.per_rank, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))
        self.shards = {"weight": Shard(0, self.start, min(self.start + self.per_rank, vocab_size), vocab_size)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.group.distributed:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.group.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocabulary share, gathered into the full vocabulary on rank 0
    only (the sampler runs there); the other ranks get None."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        logits = F.linear(hidden, self.weight)
        if not self.group.distributed:
            return logits
        if hidden.shape[0] == 0:  # every rank sees the same batch, so all skip the gather
            return logits.new_empty(0, self.vocab_size) if self.group.rank == 0 else None
        full = self.group.gather_last_dim(logits)
        return None if full is None else full[:, : self.vocab_size]
