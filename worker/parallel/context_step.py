"""One step on a context-parallel (CP) rank: which of the step's tokens this rank computes, as the
model's inputs (the pipeline's stage runner, kvflock.worker.parallel.pipeline, runs them).

Every rank receives the whole step (kvflock.worker.tp broadcasts it). A sequence whose chunk has
at least `min_tokens` new tokens is split: each rank computes its zigzag pieces of the chunk
(kvflock.worker.parallel.context). Every other sequence (decodes, short chunks) is computed
whole by every rank. Only CP rank 0 computes logits: it holds every whole token and, thanks to
the zigzag's front padding, the last token of every split chunk.
"""

from dataclasses import dataclass

import torch

from kvflock.worker.parallel.context import zigzag_rows
from kvflock.worker.parallel.context_attention import ContextGroup, ContextParallelMetadata, SeqSlice
from kvflock.worker.runner import StepInputs


@dataclass(frozen=True)
class ContextParallel:
    """A CP rank's way of running steps: its group and the chunk length from which it splits."""

    group: ContextGroup
    min_tokens: int

    def localize(self, inputs: StepInputs, page: int) -> StepInputs:
        """This rank's share of a step: its input ids, positions (0 for padding), attention metadata
        and sampling rows (none but on CP rank 0), from the whole step; `page`: tokens per block in
        this rank's cache."""
        cp, rank = self.group.size, self.group.rank
        device = inputs.input_ids.device
        meta = inputs.meta
        cu = meta.cu_seqlens_q.tolist()
        context_lens = meta.context_lens.tolist()
        lengths = [cu[i + 1] - cu[i] for i in range(len(context_lens))]
        split = [n >= self.min_tokens and n > 1 for n in lengths]

        # The rows of the whole step this rank computes (-1: padding), with the sequence of each.
        rows: list[torch.Tensor] = []
        seq_of: list[torch.Tensor] = []
        whole: list[SeqSlice] = []
        num_rows = 0
        for i, n in enumerate(lengths):
            if not split[i]:
                whole.append(SeqSlice(num_rows, num_rows + n, i, context_lens[i]))
                rows.append(torch.arange(cu[i], cu[i + 1]))
                seq_of.append(torch.full((n,), i))
                num_rows += n
        num_whole = num_rows
        chunks: list[SeqSlice] = []
        every_rank: list[torch.Tensor] = []  # [cp, rows] positions of each rank's split rows, per chunk
        for i, n in enumerate(lengths):
            if split[i]:
                start = context_lens[i] - n
                pieces = torch.stack([zigzag_rows(n, cp, r) for r in range(cp)])
                width = pieces.shape[1]
                chunks.append(SeqSlice(num_rows - num_whole, num_rows - num_whole + width, i, start))
                rows.append(torch.where(pieces[rank] >= 0, pieces[rank] + cu[i], -1))
                seq_of.append(torch.full((width,), i))
                every_rank.append(torch.where(pieces >= 0, pieces + start, -1))
                num_rows += width

        row_t = torch.cat(rows).to(device)  # a step has at least one token
        pad = row_t < 0
        q_pos = inputs.positions[row_t.clamp(min=0)].masked_fill(pad, -1)
        seqs = torch.cat(seq_of).to(device)
        split_pos = (torch.cat(every_rank, dim=1) if every_rank else torch.zeros(cp, 0, dtype=torch.int64)).to(device)
        split_seqs = seqs[num_whole:]
        local = ContextParallelMetadata(
            slot_mapping=self._slots(q_pos, seqs, meta.block_tables, page),
            block_tables=meta.block_tables,
            context_lens=meta.context_lens,
            cu_seqlens_q=meta.cu_seqlens_q,
            is_decode=False,
            num_whole=num_whole,
            q_pos=q_pos,
            whole=whole,
            split=chunks,
            split_pos=split_pos,
            split_slots=torch.stack([self._slots(p, split_seqs, meta.block_tables, page) for p in split_pos]),
        )
        ids = inputs.input_ids[row_t.clamp(min=0)].masked_fill(pad, 0)
        positions = q_pos.clamp(min=0)
        if rank != 0:
            return StepInputs(ids, positions, local, row_t[:0])
        local_row = torch.full((inputs.input_ids.shape[0],), -1, dtype=torch.int64, device=device)
        local_row[row_t[~pad]] = torch.arange(row_t.shape[0], device=device)[~pad]
        return StepInputs(ids, positions, local, local_row[inputs.sample_rows])

    def _slots(self, pos: torch.Tensor, seqs: torch.Tensor, tables: torch.Tensor, page: int) -> torch.Tensor:
        """Where this rank stores the tokens at `pos` of sequences `seqs` (block tables' rows): token
        p in slot page * block + (p % block_size) // cp of its block; -1 when another rank owns it
        (or it is padding)."""
        cp, rank = self.group.size, self.group.rank
        block_size = page * cp
        safe = pos.clamp(min=0)
        blocks = tables[seqs, safe // block_size].to(torch.int64)
        slots = blocks * page + (safe % block_size) // cp
        return slots.masked_fill((pos < 0) | (pos % cp != rank), -1)
