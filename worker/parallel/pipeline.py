"""Pipeline parallelism: the model's layers split into stages, one (tensor-parallel) group of
processes each, and a step's batch cut into micro-batches that follow each other through the
stages, so that stage s works on micro-batch m while stage s + 1 works on micro-batch m - 1.

The stages are contiguous runs of layers (kvflock.shared.parallel_layout): the first also holds
the embedding, the last the final norm and the LM head; each stage's KV cache holds only its
layers, with the same block ids on every stage (one scheduler on rank 0 decides them all).

A step, on every rank: rank 0 (the scheduler's process, on the first stage) cuts the scheduled
sequences into up to `num_stages` micro-batches of about equal tokens (cutting prompt chunks
into pieces when there are fewer sequences than stages) and broadcasts them all at once
(kvflock.worker.tp). Each stage then, micro-batch after micro-batch, receives the
previous stage's hidden states and residual stream in one point-to-point message, runs its
layers and sends its own on without waiting for the send to finish, so it goes on to the next
micro-batch at once. The last stage computes the logits of the rows that sample and sends them
(tensor rank 0 of the last stage holds them whole) to rank 0, again without waiting, while it
runs its next micro-batch; rank 0, whose own micro-batches are all sent by then, receives them
in order and samples, so the sampler's state (seeded generators, penalties, grammars) stays in
one place and the logits are ready when the last micro-batch leaves the last stage: no step
waits for a separate round trip of sampled tokens.

What remains is the pipeline's fill and drain within each step: with m micro-batches over p
stages, each stage is idle for p - 1 of the m + p - 1 micro-batch slots of a step (bench/pp.py
measures it). Sending logits rather than token ids costs `sampling rows x vocabulary` values per
step, small next to the activations of a prefill and to the weights a decode step reads.
"""

from dataclasses import dataclass, field
from typing import Any

import torch

from kvflock.worker.parallel.context_step import ContextParallel
from kvflock.worker.runner import ModelRunner, StepInputs
from kvflock.worker.step_plan import ScheduledSequence, StepPlan


@dataclass(frozen=True)
class StageGroup:
    """This rank's place among the pipeline stages: `stage` of `num_stages`, and its groups
    (NCCL on GPU, gloo on CPU; None where it has no part): `pg` holds the ranks with this rank's
    tensor (and context) rank in every stage, numbered by stage, for the activations;
    `logits_pg` holds rank 0 (as 0) and the last stage's tensor rank 0 (as 1), for the logits.

    The logits have a group of their own because NCCL queues the point-to-point operations of a
    pair of ranks on one stream: with two stages, rank 0's receive of the first logits would
    wait behind its send of the last micro-batch, which waits for the last stage to receive it
    after it has sent those logits.
    """

    stage: int = 0
    num_stages: int = 1
    pg: Any = None
    logits_pg: Any = None

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.num_stages - 1

    def send_activations(self, x: torch.Tensor) -> Any:
        """Start sending `x` to the next stage; the returned work must be waited for before `x` is reused."""
        return self.pg.send([x], self.stage + 1, 0)

    def recv_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Fill `x` with what the previous stage sends next."""
        self.pg.recv([x], self.stage - 1, 0).wait()
        return x

    def send_logits(self, x: torch.Tensor) -> Any:
        """Start sending `x` to rank 0 (from the last stage); wait for the returned work as for activations."""
        return self.logits_pg.send([x], 0, 0)

    def recv_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Fill `x` with the logits the last stage sends next (on rank 0)."""
        self.logits_pg.recv([x], 1, 0).wait()
        return x


def split_micro_batches(plan: StepPlan, num_stages: int) -> list[StepPlan]:
    """The plan's sequences in up to `num_stages` contiguous runs of about equal tokens; the
    logits' rows stay in the plan's order. With fewer sequences than stages, prompt chunks are
    cut into pieces first (`_split_prompts`), so that one long prompt fills the pipeline too."""
    items = _split_prompts(plan.scheduled, num_stages) if num_stages > 1 else plan.scheduled
    count = min(num_stages, len(items))
    if count <= 1:
        return [plan]
    total, runs, current, done = plan.num_tokens, [], [], 0
    for i, item in enumerate(items):
        current.append(item)
        done += item.num_new_tokens
        left_items, left_runs = len(items) - i - 1, count - len(runs) - 1
        # close the run once it reaches its share, or when every later item must start a run
        if left_runs and (done * count >= total * (len(runs) + 1) or left_items == left_runs):
            runs.append(current)
            current = []
    runs.append(current)
    return [StepPlan(run) for run in runs]


def _split_prompts(items: list[ScheduledSequence], count: int) -> list[ScheduledSequence]:
    """`items` with the largest prompt chunks halved until there are `count` (or no chunk of two
    tokens is left), each half in its place. The first half neither samples nor has drafts; it
    runs one micro-batch ahead on every stage, so its KV is in the cache when the second half
    attends to it, as with chunked prefill over two steps."""
    items = list(items)
    while len(items) < count:
        splittable = [i for i, item in enumerate(items) if item.num_new_tokens >= 2 and not item.num_draft_tokens]
        if not splittable:
            break
        i = max(splittable, key=lambda j: items[j].num_new_tokens)
        item, half = items[i], items[i].num_new_tokens // 2
        first = ScheduledSequence(item.seq, item.start, item.token_ids[:half], [], item.block_ids, False, half,
                                  item.lora_slot)
        second = ScheduledSequence(item.seq, item.start + half, item.token_ids[half:], [], item.block_ids,
                                   item.samples, item.num_new_tokens - half, item.lora_slot)
        items[i:i + 1] = [first, second]
    return items


@dataclass
class _InFlight:
    """Sends not yet waited for, and the tensors they read (kept alive until then)."""

    works: list[Any] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)

    def add(self, work: Any, tensor: torch.Tensor) -> None:
        self.works.append(work)
        self.tensors.append(tensor)

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works.clear()
        self.tensors.clear()


class StageRunner:
    """Runs a step's micro-batches through this rank's stage (every rank of a replica has one;
    with a single stage it is the whole forward pass). `returns_logits`: this rank is rank 0,
    which gets the logits of every micro-batch. With `context`, this rank runs only its share of
    each micro-batch's tokens (kvflock.worker.parallel.context_step)."""

    def __init__(self, runner: ModelRunner, stages: StageGroup, returns_logits: bool,
                 context: ContextParallel | None = None) -> None:
        self.runner = runner
        self.context = context
        self.model = runner.model
        self.stages = stages
        self.returns_logits = returns_logits
        cfg = self.model.config
        self._hidden_size, self._vocab_size = cfg.hidden_size, cfg.vocab_size
        # the activations' dtype (a quantized model's packed weights have others)
        self._dtype = self.model.model.held_layers[0].input_layernorm.weight.dtype
        self._logits_dtype = torch.float64 if self._dtype == torch.float64 else torch.float32

    @torch.inference_mode()
    def run(self, micro_batches: list[StepInputs]) -> list[torch.Tensor]:
        """The logits of each micro-batch's sampling rows on rank 0 ([] on the other ranks)."""
        stages, decoder, device = self.stages, self.model.model, self.runner.device
        logits: list[torch.Tensor] = []
        in_flight = _InFlight()
        if self.context is not None:
            micro_batches = [self.context.localize(inputs, self.runner.kv_cache.shape[3]) for inputs in micro_batches]
        for inputs in micro_batches:
            if stages.first:
                assert decoder.embed_tokens is not None
                x, residual = decoder.embed_tokens(inputs.input_ids), None
            else:
                received = torch.empty(2, inputs.input_ids.shape[0], self._hidden_size, dtype=self._dtype,
                                       device=device)
                x, residual = stages.recv_activations(received).unbind(0)
            x, residual = decoder.run_layers(x, residual, inputs.positions, self.runner.kv_cache, inputs.meta)
            if not stages.last:
                out = torch.stack([x, residual])
                in_flight.add(stages.send_activations(out), out)
                continue
            assert decoder.norm is not None
            hidden, _ = decoder.norm(x, residual)
            rows = self.model.logits(hidden[inputs.sample_rows])
            if rows is None:  # another tensor rank of the last stage holds them
                continue
            if stages.first:
                logits.append(rows)
            elif inputs.sample_rows.shape[0]:
                in_flight.add(stages.send_logits(rows), rows)
        if self.returns_logits and not stages.last:
            for inputs in micro_batches:
                rows = torch.empty(inputs.sample_rows.shape[0], self._vocab_size, dtype=self._logits_dtype,
                                   device=device)
                logits.append(stages.recv_logits(rows) if rows.shape[0] else rows)
        in_flight.wait()
        return logits if self.returns_logits else []
