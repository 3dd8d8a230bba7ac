"""One simulated replica: an engine model with continuous batching, chunked prefill, a KV cache
of fixed size in blocks with a prefix cache, and a CPU tier that evicted blocks fall back to.

It mirrors what the worker's scheduler and KV manager do, at the level that decides timing:
each step decodes one token for every running sequence that finished its prefill, then spends
what is left of the token budget on prefill chunks (sequences already prefilling first, then
new ones in arrival order). A new sequence first takes the leading blocks of its prompt that
the GPU cache holds (hits: no prefill), then the ones the CPU tier holds (restored at the tier's
bandwidth, no prefill), and computes the rest. Full prompt blocks are cached under the block
hashes the router also computes; blocks no sequence uses stay cached until evicted, least
recently used first. Out of blocks for a decode, the newest sequence is preempted and later
recomputed, as the worker does.

No clock: `plan_step` returns the step and its duration, the fleet calls `finish_step` when
that time has passed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol


class StepCost(Protocol):
    def step_seconds(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float: ...


@dataclass(frozen=True)
class EngineParams:
    """The engine settings that shape a replica's timing (the worker's defaults unless said)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_blocks: int = 26_000  # 8B bf16 on an H100 at 0.9 utilization: ~52 GiB / 2 MiB per block
    cpu_blocks: int = 0  # the CPU tier, in blocks (0: no offload)
    restore_seconds_per_block: float = 0.0
    time_scale: float = 1.0  # step times relative to the cost model's device
    # Decode-only stretches as one event (the same timing, far fewer events); off, every step
    # is asked of the cost model on its own (the fit counts steps that way).
    decode_runs: bool = True


@dataclass(eq=False)
class Request:
    """One request of the trace; survives retries on other replicas."""

    id: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]
    session: int = -1
    turn: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    hit_blocks: int = 0  # of the attempt that finished: found in the GPU cache
    restored_blocks: int = 0  # of the attempt that finished: restored from the CPU tier


@dataclass(eq=False, slots=True)
class Sequence:
    """A request's attempt on this replica."""

    request: Request
    target: int  # tokens to prefill (prompt, plus what was generated before a preemption)
    computed: int = 0
    generated: int = 0
    pinned: list[int] = field(default_factory=list)  # cached block hashes this sequence holds
    private: int = 0  # blocks of its own (partial last prompt block, generated tokens)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class Step:
    """One engine step, or `repeat` decode-only steps of the same sequences in a row (a decode
    run: one event instead of one per token, cut short by `Replica.cut` when a request arrives)."""

    decodes: list[Sequence]
    chunks: list[tuple[Sequence, int]]
    prefill_tokens: int
    context_tokens: int  # of the first step
    restored_blocks: int
    seconds: float
    repeat: int = 1

    def tokens(self) -> int:
        """Output tokens the step emits."""
        return len(self.decodes) * self.repeat + sum(1 for s, n in self.chunks if s.computed + n >= s.target)


@dataclass
class Replica:
    id: str
    pool: str
    params: EngineParams
    cost: StepCost
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    refs: dict[int, int] = field(default_factory=dict)  # cached blocks in use, by hash
    free_cached: OrderedDict[int, None] = field(default_factory=OrderedDict)  # cached, unused, LRU first
    cpu: OrderedDict[int, None] = field(default_factory=OrderedDict)
    private_blocks: int = 0
    step: Step | None = None  # the step running now
    # Counters for the fleet's figures.
    prompt_blocks_looked_up: int = 0
    prompt_blocks_hit: int = 0
    prompt_blocks_restored: int = 0
    preemptions: int = 0

    # -- what the worker's /metrics would report --------------------------------------------
    @property
    def used_blocks(self) -> int:
        return len(self.refs) + self.private_blocks

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.params.kv_blocks

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    def sequences(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def check(self) -> None:
        """The KV accounting's invariants (tests call this after every event)."""
        assert len(self.refs) + len(self.free_cached) + self.private_blocks <= self.params.kv_blocks
        assert not set(self.refs) & set(self.free_cached)
        assert sum(self.refs.values()) == sum(len(s.pinned) for s in self.running)
        assert self.private_blocks == sum(s.private for s in self.running)
        assert len(self.cpu) <= self.params.cpu_blocks

    # -- requests in and out ----------------------------------------------------------------
    def enqueue(self, request: Request) -> None:
        tokens = request.prompt_tokens + request.output_tokens
        if _blocks(tokens, self.params.block_size) > self.params.kv_blocks:
            raise ValueError(f"request {request.id}: {tokens} tokens need more than the replica's"
                             f" {self.params.kv_blocks} KV blocks (trace max_context too large for kv_blocks)")
        request.attempts += 1
        self.waiting.append(Sequence(request, target=request.prompt_tokens))

    def evacuate(self) -> list[Request]:
        """The replica died: every request it held, for the router to retry elsewhere."""
        requests = [s.request for s in self.sequences()]
        self.waiting.clear()
        self.running.clear()
        self.step = None
        return requests

    # -- blocks -----------------------------------------------------------------------------
    def _room(self, blocks: int) -> bool:
        """Make `blocks` free blocks, evicting unused cached ones (to the CPU tier) if needed."""
        free = self.params.kv_blocks - len(self.refs) - len(self.free_cached) - self.private_blocks
        while free < blocks and self.free_cached:
            evicted, _ = self.free_cached.popitem(last=False)
            if self.params.cpu_blocks:
                self.cpu[evicted] = None
                self.cpu.move_to_end(evicted)
                if len(self.cpu) > self.params.cpu_blocks:
                    self.cpu.popitem(last=False)
            free += 1
        return free >= blocks

    def _release(self, seq: Sequence) -> None:
        # Released blocks become the most recently used; a prompt's head is released last so
        # that eviction trims prompts from their tails.
        for block in reversed(seq.pinned):
            count = self.refs[block] - 1
            if count:
                self.refs[block] = count
            else:
                del self.refs[block]
                self.free_cached[block] = None
        seq.pinned = []
        self.private_blocks -= seq.private
        seq.private = 0

    def _admit(self, seq: Sequence) -> tuple[bool, int]:
        """Give a waiting sequence its prompt's blocks; False if they do not fit. Returns the
        blocks restored from the CPU tier (their copy time goes into this step)."""
        request, bs = seq.request, self.params.block_size
        hashes = request.block_hashes if seq.target == request.prompt_tokens else ()
        hit = 0
        for block in hashes:
            if block not in self.refs and block not in self.free_cached:
                break
            hit += 1
        restored = 0
        for block in hashes[hit:]:
            if block not in self.cpu:
                break
            restored += 1
        total = _blocks(seq.target, bs)
        # Pin the hits first, so that making room cannot evict them.
        for block in hashes[:hit]:
            if block in self.free_cached:
                del self.free_cached[block]
            self.refs[block] = self.refs.get(block, 0) + 1
        if not self._room(total - hit):
            for block in hashes[:hit]:  # undo: it waits, its hits stay cached
                count = self.refs.pop(block) - 1
                if count:
                    self.refs[block] = count
                else:
                    self.free_cached[block] = None
            return False, 0
        for block in hashes[hit:]:
            self.refs[block] = self.refs.get(block, 0) + 1
            self.cpu.pop(block, None)
        seq.pinned = list(hashes)
        seq.private = total - len(hashes)
        self.private_blocks += seq.private
        # The last prompt token is always computed: its logits give the first output token.
        seq.computed = min((hit + restored) * bs, seq.target - 1)
        self.prompt_blocks_looked_up += len(hashes)
        self.prompt_blocks_hit += hit
        self.prompt_blocks_restored += restored
        request.hit_blocks, request.restored_blocks = hit, restored
        return True, restored

    def _preempt(self) -> None:
        victim = self.running.pop()
        self._release(victim)
        victim.target = victim.request.prompt_tokens + victim.generated
        victim.computed = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1

    # -- steps ------------------------------------------------------------------------------
    def plan_step(self) -> Step | None:
        """The next step, or None when there is nothing to do."""
        run = self._decode_run()
        if run is not None:
            self.step = run
            return run
        p, bs = self.params, self.params.block_size
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq.prefilling:  # also true of a sequence preempted just now: it prefills again
                continue
            tokens = seq.request.prompt_tokens + seq.generated
            if _blocks(tokens + 1, bs) > len(seq.pinned) + seq.private:
                while not self._room(1):
                    if self.running[-1] is seq or len(self.running) == 1:
                        break
                    self._preempt()
                if not self._room(1):  # alone and out of blocks: recompute it later
                    self.running.remove(seq)
                    self._release(seq)
                    seq.target, seq.computed = seq.request.prompt_tokens + seq.generated, 0
                    self.waiting.appendleft(seq)
                    self.preemptions += 1
                    continue
                seq.private += 1
                self.private_blocks += 1
            decodes.append(seq)
        budget = p.max_num_batched_tokens - len(decodes)
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if seq.prefilling and budget > 0:
                n = min(seq.target - seq.computed, budget)
                chunks.append((seq, n))
                budget -= n
        restored = 0
        while self.waiting and budget > 0 and len(self.running) < p.max_num_seqs:
            seq = self.waiting[0]
            fits, r = self._admit(seq)
            if not fits:
                break
            self.waiting.popleft()
            self.running.append(seq)
            restored += r
            n = min(seq.target - seq.computed, budget)
            chunks.append((seq, n))
            budget -= n
        if not decodes and not chunks:
            return None
        prefill = sum(n for _, n in chunks)
        context = sum(s.request.prompt_tokens + s.generated for s in decodes) + sum(s.computed + n for s, n in chunks)
        seconds = (self.cost.step_seconds(prefill, len(decodes), context) * p.time_scale
                   + restored * p.restore_seconds_per_block)
        self.step = Step(decodes, chunks, prefill, context, restored, seconds)
        return self.step

    def _run_seconds(self, decodes: int, context: int, steps: int) -> float:
        """`steps` decode steps of `decodes` sequences whose context starts at `context` tokens
        and grows by one token each per step (the cost model is linear in the context)."""
        first = self.cost.step_seconds(0, decodes, context)
        growth = self.cost.step_seconds(0, decodes, context + decodes) - first
        return (steps * first + growth * steps * (steps - 1) / 2) * self.params.time_scale

    def _decode_run(self) -> Step | None:
        """Several decode steps at once when nothing but decoding can happen until a sequence
        finishes: nothing is prefilling or waiting, and the whole run's blocks are free already."""
        if not self.params.decode_runs or self.waiting or not self.running or any(s.prefilling for s in self.running):
            return None
        bs = self.params.block_size
        steps = min(s.request.output_tokens - s.generated for s in self.running)
        if steps < 2:
            return None
        lengths = [s.request.prompt_tokens + s.generated for s in self.running]
        needed = sum(_blocks(n + steps, bs) - len(s.pinned) - s.private for n, s in zip(lengths, self.running))
        free = self.params.kv_blocks - len(self.refs) - len(self.free_cached) - self.private_blocks
        if needed > free:  # the run would evict cached blocks earlier than step by step does
            return None
        context = sum(lengths)
        seconds = self._run_seconds(len(self.running), context, steps)
        return Step(list(self.running), [], 0, context, 0, seconds, repeat=steps)

    def cut(self, elapsed: float) -> float | None:
        """A request arrived `elapsed` seconds into a decode run: the run stops after the step in
        progress, so that the next step can take the request. The new length of the run in
        seconds, or None when it ends anyway."""
        step = self.step
        if step is None or step.repeat < 2:
            return None
        lo, hi = 1, step.repeat  # the fewest steps whose time reaches `elapsed`
        while lo < hi:
            mid = (lo + hi) // 2
            if self._run_seconds(len(step.decodes), step.context_tokens, mid) >= elapsed:
                hi = mid
            else:
                lo = mid + 1
        if lo >= step.repeat:
            return None
        step.repeat = lo
        step.seconds = self._run_seconds(len(step.decodes), step.context_tokens, lo)
        return step.seconds

    def finish_step(self, now: float) -> list[Request]:
        """Apply the running step's outcome at `now`; the requests it finished."""
        step, self.step = self.step, None
        assert step is not None
        done: list[Request] = []
        emitted: list[Sequence] = list(step.decodes)
        for seq, n in step.chunks:
            seq.computed += n
            if not seq.prefilling:
                emitted.append(seq)
        bs = self.params.block_size
        for seq in step.decodes:
            if step.repeat > 1:  # a decode run allocates its blocks here (plan_step checked they fit)
                seq.generated += step.repeat - 1
                grown = _blocks(seq.request.prompt_tokens + seq.generated + 1, bs) - len(seq.pinned) - seq.private
                if grown > 0:
                    assert self._room(grown)
                    seq.private += grown
                    self.private_blocks += grown
        for seq in emitted:
            seq.generated += 1
            request = seq.request
            if request.first_token_at is None:
                request.first_token_at = now
            if seq.generated >= request.output_tokens:
                request.finished_at = now
                self.running.remove(seq)
                self._release(seq)
                done.append(request)
        return done
