"""The mixture-of-experts feed-forward block (Qwen2-MoE, Qwen3-MoE, Mixtral) and how its experts
are spread over tensor-parallel ranks.

The router is the one transformers defines: softmax over the experts in float32, the top k,
renormalized to sum to one where the model says so (always for Mixtral, `norm_topk_prob` for
Qwen); Qwen rounds the weights to the model's dtype, Mixtral keeps them in float32. Qwen2-MoE
adds a shared expert that every token passes through, scaled by sigmoid(shared_expert_gate(x)).

Two ways to spread the experts over TP ranks:

- split (default): every rank holds its share of every expert's intermediate features, as the
  dense MLP is split;
- expert parallel: each rank holds num_experts / tp experts whole, and skips the (token, expert)
  pairs routed to the others' experts.

Under TP every rank's activations already hold every token (each block ends in an all-reduce),
so each rank routes every token itself (the router is replicated, and computes the same on every
rank) and no all-gather is needed to bring tokens to their experts' rank; each rank computes its
part of every token's output (partial sums over its features, or the whole outputs of its
experts), and one all-reduce, the reduce-scatter plus all-gather the next block would need,
sums the parts, shared expert included: the dense MLP's one all-reduce, no more.
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

from kvflock.kernels.fused_moe import fused_moe, fused_moe_ref
from kvflock.worker.config import ModelConfig
from kvflock.worker.model.parallel import SINGLE_RANK, ColumnParallelLinear, RowParallelLinear, TPGroup, input_major

# Mixtral checkpoints name the block and the experts' projections otherwise.
_MIXTRAL_NAMES = re.compile(r"\.block_sparse_moe\.(?:gate|experts\.\d+\.(w1|w2|w3))\.")
_MIXTRAL_PROJECTIONS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def param_name(checkpoint_name: str) -> str:
    """Our parameter's name for a checkpoint tensor: Mixtral's `block_sparse_moe.experts.3.w1` is
    `mlp.experts.3.gate_proj`, as Qwen's checkpoints call it; other names are ours already."""
    match = _MIXTRAL_NAMES.search(checkpoint_name)
    if match is None:
        return checkpoint_name
    inner = match.group(0).replace(".block_sparse_moe.", ".mlp.")
    if match.group(1):
        inner = inner.replace(f".{match.group(1)}.", f".{_MIXTRAL_PROJECTIONS[match.group(1)]}.")
    return checkpoint_name.replace(match.group(0), inner)


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, expert) of an expert's parameter name, else None."""
    match = _EXPERT_NAME.match(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


class _Expert(nn.Module):
    """One expert's projections, named as in checkpoints, holding this rank's features
    [start, start + size); the block computes with their stacked copies."""

    def __init__(self, hidden: int, intermediate: int, start: int, size: int) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, False, start, size)
        self.up_proj = ColumnParallelLinear(hidden, intermediate, False, start, size)
        self.down_proj = RowParallelLinear(intermediate, hidden, False, SINGLE_RANK, start, size)


class SparseMoE(nn.Module):
    """Routes each token to its top-k experts and sums their weighted outputs (plus the shared
    expert's, given as `shared_expert` with its output left unreduced); see the module doc."""

    def __init__(
        self, cfg: ModelConfig, group: TPGroup, triton: bool, expert_parallel: bool, shared_expert: nn.Module | None
    ) -> None:
        super().__init__()
        assert cfg.moe is not None
        moe = cfg.moe
        self.group, self.triton = group, triton
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        self.float32_weights = cfg.architecture == "mixtral"
        self.num_experts = moe.num_experts
        if expert_parallel:
            self.num_local = moe.num_experts // group.world_size
            self.first_expert = group.rank * self.num_local
            start, size = 0, moe.intermediate_size
        else:
            self.num_local, self.first_expert = moe.num_experts, 0
            size = moe.intermediate_size // group.world_size
            start = group.rank * size
        self.gate = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        local = range(self.first_expert, self.first_expert + self.num_local)
        self.experts = nn.ModuleDict(
            {str(e): _Expert(cfg.hidden_size, moe.intermediate_size, start, size) for e in local}
        )
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared_expert is not None else None
        self.w13 = self.w2 = torch.empty(0)

    def holds_expert(self, expert: int) -> bool:
        return self.first_expert <= expert < self.first_expert + self.num_local

    def fuse_experts(self, input_major_weights: bool) -> None:
        """Stack the experts' weights into w13 [experts, 2 * features, hidden] ([gate | up]) and
        w2 [experts, hidden, features], the grouped GEMMs' operands, each expert's matrix stored
        input-major when `input_major_weights` (as the dense layers on CUDA); the experts'
        parameters become views of them."""
        experts = list(self.experts.values())
        w13 = torch.stack([torch.cat([e.gate_proj.weight.data, e.up_proj.weight.data]) for e in experts])
        w2 = torch.stack([e.down_proj.weight.data for e in experts])
        if input_major_weights:
            w13, w2 = (input_major(w) for w in (w13, w2))
        rows = w13.shape[1] // 2
        for i, e in enumerate(experts):
            e.gate_proj.weight.data, e.up_proj.weight.data = w13[i, :rows], w13[i, rows:]
            e.down_proj.weight.data = w2[i]
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float32_weights:
            weights = weights.to(x.dtype)
        if self.num_local < self.num_experts:  # another rank's expert: the id past this rank's last
            ids = ids - self.first_expert
            ids = ids.masked_fill((ids < 0) | (ids >= self.num_local), self.num_local)
        out = (fused_moe if self.triton else fused_moe_ref)(x, self.w13, self.w2, ids, weights)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.group.all_reduce(out)
