"""The engine's step loop: requests in, one scheduled model step at a time, outputs out.

`LLMEngine.step()` schedules a step (kvflock.worker.scheduler), carries out its KV transfers,
runs it, samples, has the scheduler apply the outcome (tokens, stop conditions from
kvflock.worker.detokenizer) and reports every request that made progress. The KV cache is
sized by kvflock.worker.kv.sizing; requests are checked by kvflock.worker.inputs. Bad
requests are refused in `add_request` with a ValueError naming the field; a failure while
finishing one request's step (e.g. its detokenization) ends that request with finish_reason
"error" and leaves the others running.

With async scheduling a step is launched (scheduled, queued on the device, sampled there)
and completed (its tokens read, stop conditions applied) one call later: each `step()`
launches step n+1 before it completes step n, so the host's work for both runs while the
device computes step n, and the device never waits for the host. Step n+1 reads the tokens
of step n on the device (placeholders, kvflock.worker.sequence). A sequence that step n
finishes has one more token computed by step n+1, which is dropped. Penalties need every
token on the host, so a step that samples with them is completed before the next is launched.

Structured outputs (kvflock.worker.structured_output): a request's grammar is compiled before it
is added (`add_request` takes it compiled, or compiles it), each of its sequences advances its
own matcher in the post-step update, and a matcher that allows nothing but EOS ends its sequence
("stop"). A step with constrained sequences is queued on the device without its sampling; the
host fills the grammar masks while the forward pass runs, then queues the sampling. With async
scheduling that happens after the previous step is completed, whose tokens the masks depend on,
so the device computes this step's forward pass while the host completes the previous one.

With `enable_lora` a request may name a LoRA adapter (`add_request(..., lora_name=...)`):
the engine registers adapters (`load_lora`, `unload_lora`), and before each step gives every
scheduled sequence its adapter's device slot (kvflock.worker.lora.manager).
"""

import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvflock.worker.attention import select_attention_backend
from kvflock.worker.config import EngineConfig, ModelConfig, SamplingParams
from kvflock.worker.cuda_graphs import capture_batch_sizes
from kvflock.worker.detokenizer import Detokenizer
from kvflock.worker.inputs import InputProcessor
from kvflock.worker.kv.manager import KVCacheManager
from kvflock.worker.kv.sizing import max_model_len, num_kv_blocks, offload_tiers
from kvflock.worker.lora.adapter import LoRAWeights
from kvflock.worker.lora.layers import LoRALayers
from kvflock.worker.lora.layers import detach as detach_lora
from kvflock.worker.lora.manager import LoRAManager, LoRAStats
from kvflock.worker.model.loader import LoadedModel, load
from kvflock.worker.model.tokenizer import read_chat_template
from kvflock.worker.runner import allocate_kv_cache
from kvflock.worker.sampler import SampledTokens, Sampler
from kvflock.worker.scheduler import Scheduler
from kvflock.worker.sequence import SampleResult, Sequence, TokenLogprobs
from kvflock.worker.spec_decode.speculator import load_draft_model, make_speculator
from kvflock.worker.spec_decode.verify import SpecDecodeStats
from kvflock.worker.step_plan import ScheduledSequence, StepPlan
from kvflock.worker.structured_output import Grammar, GrammarCompiler, fill_masks
from kvflock.worker.tp import make_runner

log = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class EngineStats:
    """A snapshot of the engine's gauges and counters, for metrics."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    num_preemptions: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    spec_decode: SpecDecodeStats | None  # None when speculative decoding is off
    lora: LoRAStats | None = None  # None when LoRA is off


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class _LaunchedStep:
    """A step queued on the device: its plan, the items of it that sample, and their tokens (on
    the device, or already on the host with speculative decoding); until they are sampled, the
    logits they are sampled from."""

    plan: StepPlan
    sampling: list[ScheduledSequence]
    sampled: SampledTokens | None = None
    emitted: list[list[SampleResult]] | None = None
    logits: torch.Tensor | None = None

    @property
    def next_may_launch_first(self) -> bool:
        """Whether the next step may be launched before this one's tokens reach the host."""
        on_device = self.sampled is not None or not self.sampling
        return on_device and not any(item.seq.params.has_penalties for item in self.sampling)


class LLMEngine:
    """`loaded` lets several engines (e.g. with other scheduling limits) share one model load;
    its dtype and device win over the config's. `draft` does the same for the draft model of
    speculative decoding."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None,
                 draft: LoadedModel | None = None) -> None:
        started = time.perf_counter()
        self.config = config
        chat_template = read_chat_template(config.chat_template)  # before loading: a wrong path fails at once
        self.loaded = loaded or load(config, select_attention_backend(config.torch_device()))
        self.device, self.dtype = self.loaded.device, self.loaded.dtype
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.model_config: ModelConfig = self.loaded.config
        self.tokenizer: Any = self.loaded.tokenizer
        # The template chat requests are rendered with (the tokenizer's unless the config names one).
        self.chat_template: str | None = chat_template or getattr(self.tokenizer, "chat_template", None)
        self.max_model_len = max_model_len(config, self.model_config)
        # Loaded before the KV cache is sized: its weights and its own KV cache take their share.
        self.draft = load_draft_model(config, self.loaded, self.max_model_len, draft)
        num_blocks = num_kv_blocks(config, self.loaded, self.kv_dtype, self.max_model_len, self.draft)

        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))

        kv_cache = allocate_kv_cache(self.model_config, num_blocks, config.block_size // self.loaded.cp_size,
                                     self.kv_dtype, self.device, self.loaded.tp_size, self.loaded.num_layers)
        self.tiers = offload_tiers(config, self.loaded, kv_cache)
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, self.tiers)
        self.scheduler = Scheduler(self.kv_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_loras if config.enable_lora else None)
        self.runner = make_runner(self.loaded, kv_cache, config.block_size)
        detach_lora(self.loaded.model)  # a shared model load may carry another engine's adapter hooks
        self.loras = self._make_lora_manager(config) if config.enable_lora else None
        if self._use_cuda_graphs(config):
            verify_tokens = 1 + config.num_speculative_tokens if config.speculative_method else None
            self.runner.capture_decode_graphs(self.max_model_len, capture_batch_sizes(config.max_num_seqs),
                                              verify_tokens)
        self.sampler = Sampler(self.eos_token_ids, self.device, config.seed)
        self.speculator = make_speculator(config, num_blocks, self.sampler, self.draft)
        self._inputs = InputProcessor(self.tokenizer, self.model_config.vocab_size, self.max_model_len)
        self._detokenizer = Detokenizer(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self.async_scheduling = self._use_async_scheduling(config)
        self._in_flight: _LaunchedStep | None = None
        log.info(
            "engine ready in %.2fs: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
            time.perf_counter() - started, config.model, self.device, self.dtype, num_blocks,
            config.block_size, self.max_model_len,
        )

    def _make_lora_manager(self, config: EngineConfig) -> LoRAManager:
        """Adapter slots hooked into the model before any CUDA graph is captured (the graphs
        then hold the adapter kernels, reading the slots and the step's grouping)."""
        layers = LoRALayers(self.loaded.model, config.max_loras, config.max_lora_rank, config.max_num_batched_tokens,
                            triton=self.loaded.model.model.layers[0].self_attn.backend.triton_pointwise)
        self.runner.lora = layers
        return LoRAManager(layers, self.model_config, config.max_loras, config.max_lora_rank, config.max_cpu_loras,
                           self.dtype, pin_memory=self.device.type == "cuda")

    def load_lora(self, name: str, path: str, adapter: LoRAWeights | None = None) -> None:
        """Serve the adapter folder `path` as `name` (ValueError naming lora_path if it is not a
        usable adapter); `adapter`: its weights when already read (LoRAManager.read)."""
        if self.loras is None:
            raise ValueError("lora_name: this engine serves no adapters; start it with enable_lora")
        if name in self.loras.names and self.loras.path(name) != str(path):
            raise ValueError(f"lora_name: {name!r} is already loaded from {self.loras.path(name)}; unload it first")
        self.loras.register(name, path, adapter)

    def unload_lora(self, name: str) -> None:
        """Stop serving `name`; ValueError if unknown or still in use by a request."""
        if self.loras is None or name not in self.loras.names:
            raise ValueError(f"lora_name: no adapter {name!r} is loaded")
        users = [r for r in self._requests.values() if any(s.lora_name == name for s in r.seqs)]
        if users:
            raise ValueError(f"lora_name: {name!r} is in use by {len(users)} request(s); unload it when they finish")
        self.loras.unregister(name)

    def _use_cuda_graphs(self, config: EngineConfig) -> bool:
        """On CUDA with the Triton kernels and one rank (graph capture would need every rank of
        a tensor-parallel replica to capture in step)."""
        backend = self.loaded.model.model.layers[0].self_attn.backend
        return (self.device.type == "cuda" and not config.enforce_eager and self.loaded.replica is None
                and backend.triton_pointwise)

    def _use_async_scheduling(self, config: EngineConfig) -> bool:
        if config.async_scheduling is not None:
            return config.async_scheduling
        return self.device.type == "cuda" and self.loaded.replica is None and self.speculator is None

    # -- requests -----------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    grammar: Grammar | None = None, lora_name: str | None = None,
                    generated: list[int] | None = None) -> None:
        """`grammar`: params.structured_output compiled by `self.grammars` (the server compiles it
        off the engine's thread); compiled here when not given. `lora_name`: the adapter to run with.
        `generated`: tokens this request already generated elsewhere (a stream continued from a
        worker that went away); its one sequence starts as if it had generated them here."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        root = None
        if lora_name is not None:
            if self.loras is None or lora_name not in self.loras.names:
                raise ValueError(f"model: no adapter {lora_name!r} is loaded")
            root = self.loras.block_hash_root(lora_name)
        prompt_in = self._inputs.process(prompt, params)
        if params.structured_output is not None and grammar is None:
            grammar = self.grammars.compile(params.structured_output)
        ids = prompt_in.token_ids
        if generated:
            self._check_continuation(ids, params, generated)
        request = _Request(request_id, prompt_in.text, ids)
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seq = Sequence(next(self._seq_ids), request_id, i, ids, params, generator, lora_name=lora_name,
                           block_hash_root=root)
            if params.structured_output is not None:
                seq.grammar = grammar.matcher()
            if generated:
                self._continue(seq, generated)
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = request
        if lora_name is not None and self.loras is not None:
            self.loras.stats.requests[lora_name] += 1

    def _check_continuation(self, prompt_ids: list[int], params: SamplingParams, generated: list[int]) -> None:
        field = "kvflock_continuation.token_ids"
        if params.n != 1:
            raise ValueError(f"{field}: a continued request has one completion (n=1), got n={params.n}")
        bad = [t for t in generated if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"{field}: token ids must be in [0, {self.model_config.vocab_size}); got {bad[:3]}")
        if params.max_tokens is not None and len(generated) >= params.max_tokens:
            raise ValueError(f"{field}: {len(generated)} tokens already reach max_tokens={params.max_tokens}")
        if len(prompt_ids) + len(generated) >= self.max_model_len:
            raise ValueError(f"{field}: the prompt and {len(generated)} generated tokens fill "
                             f"max_model_len={self.max_model_len}")

    def _continue(self, seq: Sequence, generated: list[int]) -> None:
        """Put the sequence where the worker that generated `generated` left it: its text, and its
        grammar past those tokens. Their logprobs were sent by that worker, so none are kept here."""
        seq.output_token_ids = list(generated)
        seq.token_ids.extend(generated)
        if seq.grammar is not None:
            for token in generated:
                seq.grammar.accept(token)
        if self.tokenizer is not None:
            text = self.tokenizer.decode(generated, skip_special_tokens=seq.params.skip_special_tokens)
            seq.output_text = text.rstrip("\ufffd")

    def abort_request(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._finish(seq)

    def warm_up(self) -> None:
        """Run one tiny request through every stage, so the first user request pays no
        one-time costs."""
        started = time.perf_counter()
        self.add_request("warm-up", [0], SamplingParams(max_tokens=2, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()
        log.info("warm-up done in %.2fs", time.perf_counter() - started)

    def stats(self) -> EngineStats:
        pool, scheduler = self.kv_manager.pool, self.scheduler
        spec = None if self.speculator is None else replace(self.speculator.stats)
        return EngineStats(len(scheduler.running), len(scheduler.waiting), pool.capacity, pool.capacity - pool.num_free,
                           pool.num_cached, scheduler.num_preemptions, scheduler.prefix_queried_tokens,
                           scheduler.prefix_hit_tokens, spec, None if self.loras is None else replace(
                               self.loras.stats, requests=self.loras.stats.requests.copy(),
                               generation_tokens=self.loras.stats.generation_tokens.copy()))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    # -- the step loop ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Advance by one model step and report the requests that made progress. With async
        scheduling the report is of the step launched by the previous call."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not previous.next_may_launch_first:
            return self._complete(previous)
        current = self._launch(previous)
        outputs = self._complete(previous) if previous is not None else []
        if current is not None:
            if current.logits is not None:
                self._sample(current)  # its grammar masks needed the previous step's tokens
            if self.async_scheduling:
                self._in_flight = current
            else:
                outputs = self._complete(current)
        return outputs

    def _launch(self, previous: _LaunchedStep | None) -> _LaunchedStep | None:
        """Schedule a step, carry out its KV transfers and queue it on the device, sampling
        included."""
        drafts = None
        if self.speculator is not None:
            drafts = self.speculator.propose(self.scheduler.running, self.max_model_len)
        plan = self._transfer_kv(self.scheduler.schedule(drafts))
        if not plan.scheduled:
            return None
        if self.loras is not None:
            self.loras.assign(plan)
        sampling = plan.sampling
        pending = None
        if previous is not None and previous.sampled is not None and any(
                item.seq.num_pending_tokens for item in plan.scheduled):
            pending = previous.sampled.token_ids
        started = time.perf_counter()
        logits = self.runner.execute(plan, pending)
        if self.tiers is not None and plan.num_tokens > len(plan.scheduled):
            self.tiers.observe_prefill(plan.num_tokens, time.perf_counter() - started)
        step = _LaunchedStep(plan, sampling)
        if not sampling:
            step.emitted = []
            return step
        step.logits = logits
        if not any(item.seq.grammar is not None for item in sampling):
            self._sample(step)
        return step

    def _sample(self, step: _LaunchedStep) -> None:
        """Queue the step's sampling, its constrained rows masked by their grammars."""
        logits, step.logits = step.logits, None
        masks = fill_masks(step.sampling, self.model_config.vocab_size)
        if self.speculator is not None:
            step.emitted = self.speculator.sample(logits, step.sampling, masks)
            return
        step.sampled = self.sampler.sample(logits, [item.seq for item in step.sampling], masks)
        for row, item in enumerate(step.sampling):
            if not item.seq.is_finished:  # one the previous step finished has no tokens to wait for
                item.seq.append_pending(row)

    def _transfer_kv(self, plan: StepPlan) -> StepPlan:
        """Carry out the plan's KV transfers before its forward pass: evicted blocks go down to
        the CPU and disk tiers (queued, and issued before anything can overwrite them), then
        the planned restores come up. A sequence whose restore falls short leaves the step."""
        if self.tiers is None:  # without lower tiers the KV cache manager plans no transfers
            return plan
        transfers = plan.kv_transfers
        # The restores' CPU copies must outlive the offloads, which may evict CPU blocks.
        self.tiers.pin(transfers.restored_hashes)
        for block, block_hash in transfers.offloads:
            self.tiers.offload(block, block_hash)
        if transfers.restores:
            restored = [self.tiers.restore(r.block_hashes, r.block_ids) for r in transfers.restores]
            plan = self.scheduler.on_kv_restored(plan, restored)
        self.tiers.before_forward()
        return plan

    def _complete(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Read the step's tokens and apply them (kvflock.worker.scheduler.Scheduler.update);
        the requests that progressed."""
        emitted = step.emitted if step.sampled is None else [[result] for result in step.sampled.results()]
        if self.loras is not None:
            for item, results in zip(step.sampling, emitted):
                if item.seq.lora_name is not None:
                    self.loras.stats.generation_tokens[item.seq.lora_name] += len(results)
        progressed: dict[str, _Request] = {}
        for seq in self.scheduler.update(step.plan, emitted, self._apply_token):
            if seq.is_finished and self.speculator is not None:
                self.speculator.release(seq)

            progressed[seq.request_id] = self._requests[seq.request_id]

        outputs = [self._output(r) for r in progressed.values()]
        for out in outputs:
            if out.finished:
                del self._requests[out.request_id]
        return outputs

    def _apply_token(self, seq: Sequence) -> None:
        """After a sequence's new token: its grammar advances over it, then the stop conditions,
        to which a complete grammar adds its own."""
        if seq.grammar is not None:
            seq.grammar.accept(seq.output_token_ids[-1])
        self._detokenizer.check_stop(seq)
        if seq.finish_reason is None and seq.grammar is not None and seq.grammar.is_terminated:
            seq.finish_reason = "stop"

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    def _output(self, request: _Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=s.index,
                text=s.output_text,
                token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.params.logprobs is not None else None,
            )
            for s in request.seqs
        ]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions, request.finished)
