"""Runs one scheduled step on the model: builds the flat batch tensors and the attention
metadata from the scheduler's output, runs the forward pass, returns the logits of the
sequences that sample this step."""

import torch

from kvfleet.worker.attention import AttentionMetadata
from kvfleet.worker.config import ModelConfig
from kvfleet.worker.model.llama import LlamaForCausalLM
from kvfleet.worker.scheduler import SchedulerOutput


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One tensor for every layer, blocks outermost (shared/DESIGN.md): a block of all layers
    is one contiguous span, so moving it between tiers is a single copy."""
    shape = (num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> torch.Tensor:
        """Logits [num_sampling_sequences, vocab] in the order of `batch.scheduled`."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for item in batch.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            cu_seqlens.append(cu_seqlens[-1] + item.num_new_tokens)
            context_lens.append(end)
            if item.samples:
                sample_rows.append(cu_seqlens[-1] - 1)

        max_blocks = max(len(item.seq.block_table) for item in batch.scheduled)
        tables = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in batch.scheduled]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            context_lens=tensor(context_lens, torch.int32),
            cu_seqlens_q=tensor(cu_seqlens, torch.int32),
            is_decode=len(input_ids) == len(batch.scheduled),
        )
        hidden = self.model(tensor(input_ids, torch.int64), tensor(positions, torch.int64), self.kv_cache, meta)
        return self.model.logits(hidden[tensor(sample_rows, torch.int64)])
