"""A replica of several processes: tensor parallelism (each stage's layers split over its
ranks) times pipeline parallelism (the layers split into stages, kvflock.worker.parallel.pipeline),
one process (and GPU) per rank, laid out as kvflock.shared.parallel_layout says.

Rank 0 is the engine's own process: it owns the scheduler, the sampler and the server, and runs
the first stage. Each step it cuts the batch into micro-batches (one with a single stage) and
broadcasts them packed (kvflock.worker.runner.pack_step: a few integers per token, three
broadcasts) to every other rank; each runs its stage's part of every micro-batch and then
waits for the next step. The batch travels over a gloo group of all ranks on the CPU, so idle
ranks wait in a socket read; activations use one group per tensor-parallel group and one per
pipeline (NCCL on GPU, gloo on CPU). With context parallelism, the ranks of one stage and tensor
rank form a context-parallel group (kvflock.worker.parallel.context_attention): each runs its
share of every micro-batch's tokens (kvflock.worker.parallel.context_step).

A replica is all or nothing. When any rank dies, rank 0 logs which one, kills and reaps the
others and exits with status 1, so that the pod restarts; a rank whose rank 0 is gone exits
by itself. Waiting for the next step has no time limit (a server may idle for days); a
collective inside a step has one.
"""

import argparse
import atexit
import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from kvflock.shared.parallel_layout import ParallelLayout, check_pipeline_size
from kvflock.worker.attention import AttentionBackend, select_attention_backend
from kvflock.worker.config import EngineConfig
from kvflock.worker.model.llama import LlamaForCausalLM
from kvflock.worker.model.loader import LoadedModel, load
from kvflock.worker.model.parallel import TPGroup, check_tp_size
from kvflock.worker.model.source import read_model_config, resolve_model
from kvflock.worker.parallel.context_attention import ContextGroup, ContextParallelAttention
from kvflock.worker.parallel.context_step import ContextParallel
from kvflock.worker.parallel.pipeline import StageGroup, StageRunner, split_micro_batches
from kvflock.worker.runner import ModelRunner, StepShape, allocate_kv_cache, pack_step, unpack_step
from kvflock.worker.step_plan import StepPlan

log = logging.getLogger(__name__)

# Rank 0 -> other ranks: a header of five int64 [command, four arguments], then for a step of
# n micro-batches their n StepShapes (5 int64 each) and their packed batches, concatenated.
_ALLOCATE_KV, _STEP = 1, 2
_HEADER_LEN = 5
_SHAPE_LEN = 5
# Ranks wait for the next step as long as it takes; dead ranks are found by the watchdogs.
_IDLE_TIMEOUT = datetime.timedelta(days=365)
# A collective inside a step (the first step may include kernel compilation on every rank).
_STEP_TIMEOUT = datetime.timedelta(minutes=10)
_CONNECT_TIMEOUT = datetime.timedelta(minutes=5)
_PARENT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class RankGroups:
    """One rank's process groups: `batch` (gloo, every rank of the replica) carries each step
    from rank 0; `tp` and `stages` carry activations within a stage and between stages; `cp`
    joins the ranks that split a sequence (kvflock.worker.parallel.context_attention; None with
    context_parallel_size 1)."""

    batch: Any
    tp: TPGroup
    stages: StageGroup
    cp: ContextGroup | None = None

    def barrier(self) -> None:
        """Return once every rank of the replica has called it."""
        self.batch.barrier(dist.BarrierOptions()).wait()

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's CPU tensor `x` into every rank's `x` of the same shape, in place."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.batch.broadcast([x], opts).wait()
        return x


class Replica:
    """Rank 0's handle on the other ranks: sends them work and watches them.

    One watchdog thread per rank waits for its process to end; unless the replica is shutting
    down, that ends this process too (`fail`).
    """

    def __init__(self, processes: list[subprocess.Popen], store: dist.TCPStore, layout: ParallelLayout) -> None:
        self.processes = processes
        self.store = store  # NCCL exchanges its communicator id through it on first use
        self.layout = layout
        self.groups: RankGroups | None = None
        self.context: ContextParallel | None = None  # rank 0's way of running steps with context parallelism
        self._closing = False
        self._lock = threading.Lock()
        for rank, process in enumerate(processes, start=1):
            threading.Thread(target=self._watch, args=(rank, process), name=f"kvflock-tp-watch-{rank}",
                             daemon=True).start()
        atexit.register(self.shutdown)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Have every other rank allocate its KV cache of the same number of blocks."""
        self._send(torch.tensor([_ALLOCATE_KV, num_blocks, block_size, 0, 0]))

    def broadcast_step(self, micro_batches: list[tuple[StepShape, torch.Tensor]]) -> None:
        shapes = [[s.num_tokens, s.num_seqs, s.num_samples, s.max_blocks, s.num_lora_slots] for s, _ in micro_batches]
        self._send(torch.tensor([_STEP, len(micro_batches), 0, 0, 0]), torch.tensor(shapes).flatten(),
                   torch.cat([packed for _, packed in micro_batches]))

    def _send(self, header: torch.Tensor, *payloads: torch.Tensor) -> None:
        assert self.groups is not None
        with self._lock:
            self.groups.broadcast(header)
            for payload in payloads:
                self.groups.broadcast(payload)

    def shutdown(self) -> None:
        """Stop the other ranks (at exit, or when the engine is done with the replica)."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.shutdown)
        for p in self.processes:
            p.terminate()
        self._reap(timeout=5.0)

    def fail(self, reason: str) -> NoReturn:
        """Take the whole replica down: log why, kill and reap every rank, exit with status 1."""
        self._closing = True
        log.error("replica (%s) failed: %s; stopping all %d ranks", self.layout.label, reason,
                  len(self.processes) + 1)
        for p in self.processes:
            p.kill()
        self._reap(timeout=5.0)
        logging.shutdown()
        os._exit(1)

    def _reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if not self._closing:
            self.fail(f"rank {rank} (pid {process.pid}) exited with code {code}")


class ReplicaRunner(ModelRunner):
    """Rank 0's runner: sends each step's micro-batches to the other ranks, then runs its own
    stage's share of them and returns the logits the last stage sends back.

    Once a step has been sent, the ranks are inside the same collectives; a failure on rank 0
    then would leave them waiting forever, so it takes the replica down instead of raising.
    """

    def __init__(self, replica: Replica, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int) -> None:
        super().__init__(model, kv_cache, block_size)
        self.replica = replica
        assert replica.groups is not None
        self.stage = StageRunner(self, replica.groups.stages, returns_logits=True, context=replica.context)
        replica.allocate_kv_cache(kv_cache.shape[0], block_size)

    def execute(self, plan: StepPlan, pending: torch.Tensor | None = None) -> torch.Tensor:
        assert pending is None, "the other ranks cannot read tokens pending on rank 0 (no async scheduling)"
        steps = [pack_step(part, self.block_size) for part in split_micro_batches(plan, self.replica.layout.pp)]
        try:
            self.replica.broadcast_step(steps)
            logits = self.stage.run([unpack_step(shape, packed.to(self.device)) for shape, packed in steps])
        except Exception as exc:
            self.replica.fail(f"rank 0 failed during a step ({exc!r})")
        return logits[0] if len(logits) == 1 else torch.cat(logits)


def make_runner(loaded: LoadedModel, kv_cache: torch.Tensor, block_size: int) -> ModelRunner:
    """The runner for one engine over `loaded`: plain, or rank 0's of a replica of several ranks
    (one engine per replica: the other ranks keep one KV cache)."""
    if loaded.replica is None:
        return ModelRunner(loaded.model, kv_cache, block_size)
    return ReplicaRunner(loaded.replica, loaded.model, kv_cache, block_size)


def load_replica(config: EngineConfig, backend: AttentionBackend, context_parallel: bool = False) -> LoadedModel:
    """Make this process rank 0 of a replica of `config.world_size` ranks: start the other ranks
    (they load their shards meanwhile), connect, load rank 0's shard of the first stage.

    With a world of 1 no process starts, but the model still communicates through a tensor-
    parallel group of one (how the NCCL path is tested on a single GPU); `context_parallel` then
    runs its steps the context-parallel way too, in a context-parallel group of one.
    """
    started = time.perf_counter()
    layout = config.layout
    model_config = read_model_config(resolve_model(config.model, config.load_format))
    check_tp_size(model_config, layout.tp, config.expert_parallel)
    check_pipeline_size(layout.pp, model_config.num_layers)
    devices = _rank_devices(config)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast is off on the lent machines
    store = dist.TCPStore("127.0.0.1", 0, layout.world_size, is_master=True, timeout=_CONNECT_TIMEOUT,
                          wait_for_workers=False)
    # Plain subprocesses, not multiprocessing: nothing of the caller's main module is re-run.
    processes = [
        subprocess.Popen([
            sys.executable, "-P", "-m", "kvflock.worker.tp", "--rank", str(rank), "--port", str(store.port),
            "--parent-pid", str(os.getpid()), "--log-level", str(logging.getLogger().getEffectiveLevel()),
            "--config", _rank_config(config, devices[rank]).model_dump_json(),
        ])
        for rank in range(1, layout.world_size)
    ]
    replica = Replica(processes, store, layout)  # watching from now on: a rank that fails to load ends this process
    replica.groups = _connect(0, layout, store, devices[0], context_parallel)
    if replica.groups.cp is not None:
        backend = ContextParallelAttention(backend, replica.groups.cp)
        replica.context = ContextParallel(replica.groups.cp, config.context_parallel_min_tokens)
    loaded = load(_rank_config(config, devices[0]), backend, replica.groups.tp,
                  layout.stage_layers(0, model_config.num_layers))
    loaded.replica = replica
    replica.groups.barrier()  # every rank has loaded its shard
    log.info("replica %s of %d ranks on %s loaded in %.2fs", layout.label, layout.world_size,
             ", ".join(map(str, devices)), time.perf_counter() - started)
    return loaded


def _rank_devices(config: EngineConfig) -> list[torch.device]:
    """One GPU per rank from the configured one on, or the CPU for every rank."""
    device, world = config.torch_device(), config.world_size
    if device.type != "cuda":
        return [device] * world
    first = device.index or 0
    if first + world > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size x pipeline_parallel_size: {config.layout.label} is {world} ranks, which need "
            f"GPUs cuda:{first}..cuda:{first + world - 1}, but this machine has {torch.cuda.device_count()}"
        )
    return [torch.device("cuda", first + rank) for rank in range(world)]


def _rank_config(config: EngineConfig, device: torch.device) -> EngineConfig:
    return config.model_copy(update={"device": str(device)})


def _connect(rank: int, layout: ParallelLayout, store: dist.Store, device: torch.device,
             context_parallel: bool = False) -> RankGroups:
    """Join the replica's groups: gloo over every rank for the per-step batch, then this rank's
    tensor-parallel group, context-parallel group, pipeline and (rank 0 and the last stage's
    tensor rank 0) the logits' group (NCCL on GPU, gloo on CPU). Every rank joins them in this
    order, so each returns when the members of its groups have joined. `context_parallel`: join a
    context-parallel group even of one rank."""
    batch = _gloo(dist.PrefixStore("batch", store), rank, layout.world_size, _IDLE_TIMEOUT)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    place = layout.place(rank)
    tp_pg = cp_pg = stage_pg = logits_pg = None
    if layout.tp > 1 or layout.world_size == 1:
        tp_pg = _device_group(dist.PrefixStore(f"tp-{place.stage}-{place.cp_rank}", store), place.tp_rank,
                              layout.tp, device)
    if layout.cp > 1 or context_parallel:
        cp_pg = _device_group(dist.PrefixStore(f"cp-{place.stage}-{place.tp_rank}", store), place.cp_rank,
                              layout.cp, device)
    if layout.pp > 1:
        stage_pg = _device_group(dist.PrefixStore(f"pp-{place.cp_rank}-{place.tp_rank}", store), place.stage,
                                 layout.pp, device)
        if place.tp_rank == place.cp_rank == 0 and place.stage in (0, layout.pp - 1):
            logits_pg = _device_group(dist.PrefixStore("logits", store), int(place.stage > 0), 2, device)
    stages = StageGroup(place.stage, layout.pp, stage_pg, logits_pg)
    cp = None if cp_pg is None else ContextGroup(place.cp_rank, layout.cp, cp_pg)
    return RankGroups(batch, TPGroup(place.tp_rank, layout.tp, tp_pg), stages, cp)


def _device_group(store: dist.Store, rank: int, size: int, device: torch.device) -> Any:
    """A group for activations: NCCL on GPU, gloo on CPU, with the time limit of a step."""
    if device.type != "cuda":
        return _gloo(store, rank, size, _STEP_TIMEOUT)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = _STEP_TIMEOUT
    return dist.ProcessGroupNCCL(store, rank, size, options)


def _gloo(store: dist.Store, rank: int, world: int, timeout: datetime.timedelta) -> dist.ProcessGroupGloo:
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, world, options)


# -- ranks 1..N-1 --------------------------------------------------------------------------


def _rank_main(rank: int, config: EngineConfig, port: int, parent_pid: int, log_level: int) -> NoReturn:
    """A rank's process: load its shard of its stage, then run whatever steps rank 0 sends until
    it is stopped (a signal) or fails (exit status 1)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 decides
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="kvflock-tp-parent", daemon=True).start()
    try:
        device, layout = config.torch_device(), config.layout
        if device.type == "cpu":  # the ranks share the worker's threads (OMP_NUM_THREADS, else the cores)
            torch.set_num_threads(max(1, torch.get_num_threads() // layout.world_size))
        store = dist.TCPStore("127.0.0.1", port, layout.world_size, is_master=False, timeout=_CONNECT_TIMEOUT)
        groups = _connect(rank, layout, store, device)
        num_layers = read_model_config(resolve_model(config.model, config.load_format)).num_layers
        stage = layout.stage_layers(groups.stages.stage, num_layers)
        backend = select_attention_backend(device)
        context = None
        if groups.cp is not None:
            backend = ContextParallelAttention(backend, groups.cp)
            context = ContextParallel(groups.cp, config.context_parallel_min_tokens)
        loaded = load(config, backend, groups.tp, stage)
        groups.barrier()
        _serve_steps(loaded, groups, torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else loaded.dtype,
                     context)
    except Exception:
        log.exception("rank %d of the replica failed", rank)
    logging.shutdown()
    os._exit(1)


def _serve_steps(loaded: LoadedModel, groups: RankGroups, kv_dtype: torch.dtype,
                 context: ContextParallel | None) -> NoReturn:
    header = torch.empty(_HEADER_LEN, dtype=torch.int64)
    stage: StageRunner | None = None
    while True:
        command, *args = groups.broadcast(header).tolist()
        if command == _ALLOCATE_KV:
            num_blocks, block_size = args[:2]
            page = block_size // (1 if context is None else context.group.size)  # its share of every block
            kv_cache = allocate_kv_cache(loaded.config, num_blocks, page, kv_dtype, loaded.device,
                                         loaded.tp_size, loaded.num_layers)
            stage = StageRunner(ModelRunner(loaded.model, kv_cache, block_size), groups.stages, returns_logits=False,
                                context=context)
        elif command == _STEP and stage is not None:
            count = args[0]
            sizes = groups.broadcast(torch.empty(count * _SHAPE_LEN, dtype=torch.int64)).view(count, _SHAPE_LEN)
            shapes = [StepShape(*row) for row in sizes.tolist()]
            packed = groups.broadcast(torch.empty(sum(s.packed_len for s in shapes), dtype=torch.int64))
            parts = packed.to(loaded.device).split([s.packed_len for s in shapes])
            stage.run([unpack_step(shape, part) for shape, part in zip(shapes, parts)])
        else:
            raise RuntimeError(f"unexpected command {command} from rank 0")


def _exit_with_parent(parent_pid: int) -> None:
    """Exit when rank 0 is gone (its children are then adopted by another process)."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_SECONDS)
    log.error("rank 0 (pid %d) is gone; exiting", parent_pid)
    logging.shutdown()
    os._exit(1)


def _main() -> None:
    parser = argparse.ArgumentParser(description="one rank of a replica (started by rank 0)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="rank 0's TCPStore")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    parser.add_argument("--config", required=True, help="this rank's EngineConfig as JSON")
    args = parser.parse_args()
    _rank_main(args.rank, EngineConfig.model_validate_json(args.config), args.port, args.parent_pid, args.log_level)


if __name__ == "__main__":
    _main()
