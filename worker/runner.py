"""Runs one scheduled step on the model: packs the step plan (kvflock.worker.step_plan) into
one flat integer tensor, unpacks it on the model's device into the batch tensors and the
attention metadata, runs the forward pass, returns the logits of the sequences that sample
this step.

The packed form is what a replica's rank 0 broadcasts to the other ranks each step
(kvflock.worker.tp): a handful of integers per token, never Python objects.

With async scheduling an input id may be a placeholder for a token the previous step sampled
(kvflock.worker.sequence); the runner reads its value from that step's sampled tokens on the
device, so the step can be queued before the host has seen them.

With LoRA adapters the packed step also groups the tokens by adapter slot (`order` and
`seg_starts`, kvflock.kernels.lora), which the runner hands to the adapter layers
(kvflock.worker.lora.layers) before the forward pass.
"""

from dataclasses import dataclass

import torch

from kvflock.worker.attention import AttentionMetadata
from kvflock.worker.config import ModelConfig
from kvflock.worker.cuda_graphs import DecodeGraphs
from kvflock.worker.lora.layers import LoRALayers
from kvflock.worker.model.llama import LlamaForCausalLM
from kvflock.worker.model.parallel import kv_heads_per_rank
from kvflock.worker.step_plan import StepPlan


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device, tp_size: int = 1,
    num_layers: int | None = None,
) -> torch.Tensor:
    """One tensor for every layer, blocks outermost (shared/DESIGN.md): a block of all layers
    is one contiguous span, so moving it between tiers is a single copy. Under tensor
    parallelism it holds only this rank's KV heads; a pipeline stage's holds its `num_layers`
    layers (default: the model's); under context parallelism `block_size` is this rank's share of
    a block (kvflock.worker.parallel.context_attention). Attention never reads a slot before it is
    written (past a context, values are masked and zeroed), so on the CPU the memory is left
    untouched: the pages are committed as blocks fill, not all at start (zeroing a 1 GiB cache took
    half a second of every worker's start and its whole size in resident memory)."""
    layers = cfg.num_layers if num_layers is None else num_layers
    shape = (num_blocks, layers, 2, block_size, kv_heads_per_rank(cfg, tp_size), cfg.head_dim)
    if device.type == "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1,
                       num_layers: int | None = None) -> int:
    """Bytes of one block on one rank (each rank holds its own KV heads' share of its stage's layers)."""
    layers = cfg.num_layers if num_layers is None else num_layers
    return layers * 2 * block_size * kv_heads_per_rank(cfg, tp_size) * cfg.head_dim * dtype.itemsize


@dataclass(frozen=True)
class StepShape:
    """The sizes that delimit the fields of a packed step: tokens, sequences, sampling
    sequences, the width of the padded block tables, and the adapter slots (0: no LoRA)."""

    num_tokens: int
    num_seqs: int
    num_samples: int
    max_blocks: int
    num_lora_slots: int = 0

    @property
    def packed_len(self) -> int:
        t, b = self.num_tokens, self.num_seqs
        lora = t + self.num_lora_slots + 1 if self.num_lora_slots else 0
        return 3 * t + 2 * b + 1 + self.num_samples + b * self.max_blocks + lora


@dataclass
class StepInputs:
    """One step's model inputs on the model's device."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor
    tokens_per_seq: int | None = None  # when every sequence has this many new tokens
    lora_order: torch.Tensor | None = None  # the tokens grouped by adapter slot (with LoRA)
    lora_seg_starts: torch.Tensor | None = None


def pack_step(plan: StepPlan, block_size: int, pin_memory: bool = False,
              num_lora_slots: int = 0) -> tuple[StepShape, torch.Tensor]:
    """The step as one int64 CPU tensor: input ids, positions, slot mapping (per token),
    context lengths, cu_seqlens, the rows that sample, then the block tables row by row, and
    with `num_lora_slots` the tokens grouped by adapter slot (order, then seg_starts).
    `pin_memory` puts it in pinned memory, so its copy to the GPU can be queued."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu_seqlens = [0]
    context_lens: list[int] = []
    sample_rows: list[int] = []
    bs = block_size
    for item in plan.scheduled:
        start, drafts = item.start, item.num_draft_tokens
        end = start + item.num_new_tokens
        input_ids.extend(item.token_ids)
        input_ids.extend(item.draft_token_ids)
        positions.extend(range(start, end))
        table = item.block_ids
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        cu_seqlens.append(cu_seqlens[-1] + item.num_new_tokens)
        context_lens.append(end)
        if item.samples:  # a sequence verifying drafts samples after each of them too
            sample_rows.extend(range(cu_seqlens[-1] - 1 - drafts, cu_seqlens[-1]))

    max_blocks = max(len(item.block_ids) for item in plan.scheduled)
    tables: list[int] = []
    for item in plan.scheduled:
        tables += item.block_ids + [0] * (max_blocks - len(item.block_ids))
    shape = StepShape(len(input_ids), len(plan.scheduled), len(sample_rows), max_blocks, num_lora_slots)
    fields = input_ids + positions + slots + context_lens + cu_seqlens + sample_rows + tables
    if num_lora_slots:
        fields += _group_by_slot(plan, cu_seqlens, num_lora_slots)
    return shape, torch.tensor(fields, dtype=torch.int64, pin_memory=pin_memory)


def _group_by_slot(plan: StepPlan, cu_seqlens: list[int], num_slots: int) -> list[int]:
    """`order` (token rows by slot, padded to the step's tokens) then `seg_starts`."""
    by_slot: list[list[int]] = [[] for _ in range(num_slots)]
    for i, item in enumerate(plan.scheduled):
        if item.lora_slot >= 0:
            by_slot[item.lora_slot].extend(range(cu_seqlens[i], cu_seqlens[i + 1]))
    order = [row for rows in by_slot for row in rows]
    seg_starts = [0]
    for rows in by_slot:
        seg_starts.append(seg_starts[-1] + len(rows))
    return order + [0] * (cu_seqlens[-1] - len(order)) + seg_starts


def unpack_step(shape: StepShape, packed: torch.Tensor) -> StepInputs:
    """Views of a packed step (already on the model's device) as the model's inputs."""
    t, b, s = shape.num_tokens, shape.num_seqs, shape.num_samples
    lora = [t, shape.num_lora_slots + 1] if shape.num_lora_slots else []
    input_ids, positions, slots, context_lens, cu_seqlens, sample_rows, tables, *grouping = packed.split(
        [t, t, t, b, b + 1, s, b * shape.max_blocks, *lora]
    )
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables.view(b, shape.max_blocks).to(torch.int32),
        context_lens=context_lens.to(torch.int32),
        cu_seqlens_q=cu_seqlens.to(torch.int32),
        is_decode=t == b,
    )
    return StepInputs(input_ids, positions, meta, sample_rows, None, *grouping)


def fill_pending(input_ids: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Input ids with each placeholder (-1 - row) replaced by `sampled[row]`."""
    rows = (-1 - input_ids).clamp(min=0)
    return torch.where(input_ids < 0, sampled[rows], input_ids)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.decode_graphs: DecodeGraphs | None = None
        self.verify_graphs: DecodeGraphs | None = None
        self.lora: LoRALayers | None = None  # set by the engine when it serves adapters

    def capture_decode_graphs(self, max_model_len: int, batch_sizes: list[int], verify_tokens: int | None = None) -> None:
        """From now on, decode steps of up to max(batch_sizes) sequences replay CUDA graphs, and
        so do steps in which every sequence verifies drafts, `verify_tokens` tokens each."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_model_len, batch_sizes)
        if verify_tokens is not None:
            self.verify_graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_model_len, batch_sizes,
                                              tokens_per_seq=verify_tokens)

    def execute(self, plan: StepPlan, pending: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [num_sampling_rows, vocab] in the order of `plan.scheduled`: one row per
        sampling sequence, 1 + num_draft_tokens for one that verifies drafts. `pending`: the
        previous step's sampled tokens, which the plan's placeholders stand for."""
        num_lora_slots = 0 if self.lora is None else self.lora.seg_starts.shape[0] - 1
        shape, packed = pack_step(plan, self.block_size, self.device.type == "cuda", num_lora_slots)
        inputs = unpack_step(shape, packed.to(self.device, non_blocking=True))
        if pending is not None:
            inputs.input_ids = fill_pending(inputs.input_ids, pending)
        first = plan.scheduled[0].num_new_tokens
        if all(item.num_new_tokens == first for item in plan.scheduled):
            inputs.tokens_per_seq = first
        logits = self.run(inputs)
        assert logits is not None, "only tensor-parallel rank 0 executes scheduled batches"
        return logits

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """The forward pass; logits on tensor-parallel rank 0, None on the other ranks."""
        meta = inputs.meta
        if self.lora is not None and inputs.lora_order is not None:
            self.lora.set_batch(inputs.lora_order, inputs.lora_seg_starts)
        graphs = next((g for g in (self.decode_graphs, self.verify_graphs) if g is not None
                       and g.tokens_per_seq == inputs.tokens_per_seq
                       and g.fits(meta.context_lens.shape[0], meta.block_tables.shape[1])), None)
        if graphs is not None:
            hidden = graphs.run(inputs.input_ids, inputs.positions, meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, meta)
        return self.model.logits(hidden[inputs.sample_rows])
