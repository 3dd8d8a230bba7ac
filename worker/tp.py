"""Tensor parallelism across processes: one replica is N ranks, one process (and GPU) each.

Rank 0 is the engine's own process: it owns the scheduler, the sampler and the server. Each
step it broadcasts the packed batch (kvflock.worker.runner.pack_step: a few integers per
token, two broadcasts) to ranks 1..N-1, which run the same forward pass over their shards
and then wait for the next step. The batch travels over a gloo group on the CPU, so idle
ranks wait in a socket read; activations use NCCL on GPU and gloo on CPU.

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
from typing import NoReturn

import torch
import torch.distributed as dist

from kvflock.worker.attention import AttentionBackend, select_attention_backend
from kvflock.worker.config import EngineConfig
from kvflock.worker.model.llama import LlamaForCausalLM
from kvflock.worker.model.loader import LoadedModel, load
from kvflock.worker.model.parallel import TPGroup, check_tp_size
from kvflock.worker.model.source import read_model_config, resolve_model
from kvflock.worker.runner import ModelRunner, StepShape, allocate_kv_cache, pack_step, unpack_step
from kvflock.worker.step_plan import StepPlan

log = logging.getLogger(__name__)

# Rank 0 -> other ranks: a header of five int64 [command, four arguments], then for a step
# the packed batch of StepShape.packed_len int64.
_ALLOCATE_KV, _STEP = 1, 2
_HEADER_LEN = 5
# Ranks wait for the next step as long as it takes; dead ranks are found by the watchdogs.
_IDLE_TIMEOUT = datetime.timedelta(days=365)
# A collective inside a step (the first step may include kernel compilation on every rank).
_STEP_TIMEOUT = datetime.timedelta(minutes=10)
_CONNECT_TIMEOUT = datetime.timedelta(minutes=5)
_PARENT_POLL_SECONDS = 0.5


class Replica:
    """Rank 0's handle on the other ranks: sends them work and watches them.

    One watchdog thread per rank waits for its process to end; unless the replica is shutting
    down, that ends this process too (`fail`).
    """

    def __init__(self, processes: list[subprocess.Popen], store: dist.TCPStore) -> None:
        self.processes = processes
        self.store = store  # NCCL exchanges its communicator id through it on first use
        self.group: TPGroup | None = None
        self._closing = False
        self._lock = threading.Lock()
        for rank, process in enumerate(processes, start=1):
            threading.Thread(target=self._watch, args=(rank, process), name=f"kvflock-tp-watch-{rank}",
                             daemon=True).start()
        atexit.register(self.shutdown)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Have every other rank allocate its KV cache of the same number of blocks."""
        self._send(torch.tensor([_ALLOCATE_KV, num_blocks, block_size, 0, 0]), None)

    def broadcast_step(self, shape: StepShape, packed: torch.Tensor) -> None:
        header = torch.tensor([_STEP, shape.num_tokens, shape.num_seqs, shape.num_samples, shape.max_blocks])
        self._send(header, packed)

    def _send(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        assert self.group is not None
        with self._lock:
            self.group.broadcast_cpu(header)
            if payload is not None:
                self.group.broadcast_cpu(payload)

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
        log.error("tensor-parallel replica failed: %s; stopping all %d ranks", reason, len(self.processes) + 1)
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


class TPModelRunner(ModelRunner):
    """Rank 0's runner: sends each step to the other ranks, then runs its own shard.

    Once a step has been sent, the ranks are inside the same collectives; a failure on rank 0
    then would leave them waiting forever, so it takes the replica down instead of raising.
    """

    def __init__(self, replica: Replica, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int) -> None:
        super().__init__(model, kv_cache, block_size)
        self.replica = replica
        replica.allocate_kv_cache(kv_cache.shape[0], block_size)

    def execute(self, plan: StepPlan, pending: torch.Tensor | None = None) -> torch.Tensor:
        assert pending is None, "the other ranks cannot read tokens pending on rank 0 (no async scheduling)"
        shape, packed = pack_step(plan, self.block_size)
        try:
            self.replica.broadcast_step(shape, packed)
            logits = self.run(unpack_step(shape, packed.to(self.device)))
        except Exception as exc:
            self.replica.fail(f"rank 0 failed during a step ({exc!r})")
        assert logits is not None
        return logits


def make_runner(loaded: LoadedModel, kv_cache: torch.Tensor, block_size: int) -> ModelRunner:
    """The runner for one engine over `loaded`: plain, or rank 0's of a tensor-parallel replica
    (one engine per replica: the other ranks keep one KV cache)."""
    if loaded.replica is None:
        return ModelRunner(loaded.model, kv_cache, block_size)
    return TPModelRunner(loaded.replica, loaded.model, kv_cache, block_size)


def load_replica(config: EngineConfig, backend: AttentionBackend) -> LoadedModel:
    """Make this process rank 0 of a replica of `config.tensor_parallel_size` ranks: start the
    other ranks (they load their shards meanwhile), connect, load rank 0's shard.

    With tensor_parallel_size 1 no process starts, but the model still communicates through
    a group of one (how the NCCL path is tested on a single GPU).
    """
    started = time.perf_counter()
    world = config.tensor_parallel_size
    check_tp_size(read_model_config(resolve_model(config.model, config.load_format)), world, config.expert_parallel)
    devices = _rank_devices(config)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast is off on the lent machines
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=_CONNECT_TIMEOUT, wait_for_workers=False)
    # Plain subprocesses, not multiprocessing: nothing of the caller's main module is re-run.
    processes = [
        subprocess.Popen([
            sys.executable, "-P", "-m", "kvflock.worker.tp", "--rank", str(rank), "--port", str(store.port),
            "--parent-pid", str(os.getpid()), "--log-level", str(logging.getLogger().getEffectiveLevel()),
            "--config", _rank_config(config, devices[rank]).model_dump_json(),
        ])
        for rank in range(1, world)
    ]
    replica = Replica(processes, store)  # watching from now on: a rank that fails to load ends this process
    replica.group = _connect(0, world, store, devices[0])
    loaded = load(_rank_config(config, devices[0]), backend, replica.group)
    loaded.replica = replica
    replica.group.barrier()  # every rank has loaded its shard
    log.info("tensor-parallel replica of %d ranks on %s loaded in %.2fs", world,
             ", ".join(map(str, devices)), time.perf_counter() - started)
    return loaded


def _rank_devices(config: EngineConfig) -> list[torch.device]:
    """One GPU per rank from the configured one on, or the CPU for every rank."""
    device, world = config.torch_device(), config.tensor_parallel_size
    if device.type != "cuda":
        return [device] * world
    first = device.index or 0
    if first + world > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size: {world} ranks need GPUs cuda:{first}..cuda:{first + world - 1}, "
            f"but this machine has {torch.cuda.device_count()}"
        )
    return [torch.device("cuda", first + rank) for rank in range(world)]


def _rank_config(config: EngineConfig, device: torch.device) -> EngineConfig:
    return config.model_copy(update={"device": str(device)})


def _connect(rank: int, world: int, store: dist.Store, device: torch.device) -> TPGroup:
    """Join the replica's two groups: gloo for the per-step batch, and NCCL (GPU) or a
    second gloo group (CPU) for activations. Returns when every rank has joined."""
    cpu_pg = _gloo(dist.PrefixStore("batch", store), rank, world, _IDLE_TIMEOUT)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _STEP_TIMEOUT
        device_pg = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, world, options)
    else:
        device_pg = _gloo(dist.PrefixStore("activations", store), rank, world, _STEP_TIMEOUT)
    return TPGroup(rank, world, device_pg, cpu_pg)


def _gloo(store: dist.Store, rank: int, world: int, timeout: datetime.timedelta) -> dist.ProcessGroupGloo:
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, world, options)


# -- ranks 1..N-1 --------------------------------------------------------------------------


def _rank_main(rank: int, config: EngineConfig, port: int, parent_pid: int, log_level: int) -> NoReturn:
    """A rank's process: load its shard, then run whatever steps rank 0 sends until it is
    stopped (a signal) or fails (exit status 1)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 decides
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="kvflock-tp-parent", daemon=True).start()
    try:
        device = config.torch_device()
        if device.type == "cpu":  # the ranks share the worker's threads (OMP_NUM_THREADS, else the cores)
            torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
        store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, is_master=False, timeout=_CONNECT_TIMEOUT)
        group = _connect(rank, config.tensor_parallel_size, store, device)
        loaded = load(config, select_attention_backend(device), group)
        group.barrier()
        _serve_steps(loaded, group)
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank)
    logging.shutdown()
    os._exit(1)


def _serve_steps(loaded: LoadedModel, group: TPGroup) -> NoReturn:
    header = torch.empty(_HEADER_LEN, dtype=torch.int64)
    runner: ModelRunner | None = None
    while True:
        command, *args = group.broadcast_cpu(header).tolist()
        if command == _ALLOCATE_KV:
            num_blocks, block_size = args[:2]
            kv_cache = allocate_kv_cache(loaded.config, num_blocks, block_size, loaded.dtype, loaded.device,
                                         group.world_size)
            runner = ModelRunner(loaded.model, kv_cache, block_size)
        elif command == _STEP and runner is not None:
            shape = StepShape(*args)
            packed = group.broadcast_cpu(torch.empty(shape.packed_len, dtype=torch.int64))
            runner.run(unpack_step(shape, packed.to(loaded.device)))
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
    parser = argparse.ArgumentParser(description="one tensor-parallel rank (started by rank 0)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="rank 0's TCPStore")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    parser.add_argument("--config", required=True, help="this rank's EngineConfig as JSON")
    args = parser.parse_args()
    _rank_main(args.rank, EngineConfig.model_validate_json(args.config), args.port, args.parent_pid, args.log_level)


if __name__ == "__main__":
    _main()
