"""CUDA graphs for decode steps.

At batch 1 an 8B model's decode step is about 290 kernel launches (9 per layer plus the ends);
launched one by one from Python they take longer than the GPU needs to read the weights. A
captured graph replays them in one launch. Decode steps are the ones worth it: they repeat
every few milliseconds with the same shapes, while prefill steps are compute-bound and vary.

One graph per batch size in `batch_sizes`; a step of n sequences replays the smallest graph of
at least n rows, the extra rows padded so that they write no KV (slot -1) and read none (context
length 0) or, in steps of several tokens per sequence, only their own (padding block 0).

With speculative decoding a second set of graphs covers verify steps, in which every sequence
runs 1 + k tokens (its last token and k drafts): `tokens_per_seq` = 1 + k, the same capture
through the prefill attention kernel with fixed sequence offsets. The graphs read their inputs from static buffers that each replay first
fills, and share one memory pool (captured largest first, so the smaller ones fit inside it).
The block-table buffer is as wide as the longest context (`max_model_len`), so the decode
kernel's split-K choice, which follows that width, is the same at every replay. The graphs end
at the final norm's hidden states: the LM head runs outside, on the rows that sample only,
since graph outputs of every size at a 128k vocabulary would hold gigabytes.
"""

import logging
import time

import torch

from kvflock.worker.attention import AttentionMetadata
from kvflock.worker.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


def capture_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_num_seqs` (at most 256): padding a batch
    costs at most 7 rows of work, and each size costs one capture."""
    top = min(max_num_seqs, 256)
    sizes = [s for s in (1, 2, 4) if s < top] + list(range(8, top + 1, 8))
    if not sizes or sizes[-1] != top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    """Captured decode forward passes of `model` over `kv_cache`, one per batch size."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, max_model_len: int,
                 batch_sizes: list[int], tokens_per_seq: int = 1) -> None:
        started = time.perf_counter()
        device = kv_cache.device
        rows = max(batch_sizes)
        tokens = rows * tokens_per_seq
        self.batch_sizes = sorted(batch_sizes)
        self.tokens_per_seq = tokens_per_seq
        # A padding sequence attends to as many keys as it has queries (the prefill kernel needs
        # its keys to start at position 0); a padding decode row attends to none.
        self._padding_context = 0 if tokens_per_seq == 1 else tokens_per_seq
        self.input_ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((rows, -(-max_model_len // block_size)), dtype=torch.int32, device=device)
        self.context_lens = torch.full((rows,), self._padding_context, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, device=device) * tokens_per_seq
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}

        pool = None
        with torch.inference_mode():
            for size in reversed(self.batch_sizes):
                meta, t = self._metadata(size), size * tokens_per_seq
                # Outside the capture first: Triton compiles its kernels, the rotary table is built.
                model(self.input_ids[:t], self.positions[:t], kv_cache, meta)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._hidden[size] = model(self.input_ids[:t], self.positions[:t], kv_cache, meta)
                pool = graph.pool()
                self._graphs[size] = graph
        torch.cuda.synchronize(device)
        log.info("captured %d CUDA graphs for steps of %d token(s) per sequence (batch sizes %d-%d) in %.1fs",
                 len(self._graphs), tokens_per_seq, self.batch_sizes[0], self.batch_sizes[-1],
                 time.perf_counter() - started)

    def _metadata(self, size: int) -> AttentionMetadata:
        t = size * self.tokens_per_seq
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:t],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            is_decode=self.tokens_per_seq == 1,
        )

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.batch_sizes[-1] and max_blocks <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [t, hidden] of a step of n sequences with `tokens_per_seq` tokens each."""
        t = input_ids.shape[0]
        n = t // self.tokens_per_seq
        size = next(s for s in self.batch_sizes if s >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.slot_mapping[:t].copy_(meta.slot_mapping)
        self.slot_mapping[t : size * self.tokens_per_seq].fill_(-1)
        # Entries right of `width` are stale but never read: context lengths bound each row.
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.context_lens[:n].copy_(meta.context_lens)
        self.context_lens[n:size].fill_(self._padding_context)
        self._graphs[size].replay()
        return self._hidden[size][:t]
