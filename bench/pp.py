"""Pipeline-parallel scaling on dummy weights of a named model shape.

For each PP size, in one run: batch-1 decode latency (median ms per step), output throughput
(tokens/s) of 256 requests, each with its ratio to the first size given (normally 1), and the
bubble of a step: the fill-and-drain share that micro-batching leaves by construction
((p - 1) / (m + p - 1) for m micro-batches over p stages) and the idle share of a stage measured
from throughput (1 - speedup / p: a stage of p holds 1/p of the layers, so without any idle time
p stages would go p times as fast). All requests use random prompts of --prompt-len tokens and
generate exactly --max-tokens tokens (EOS ignored).

A size needs tp x pp GPUs; sizes this machine cannot hold are listed as skipped, and so are
shapes whose weights would not fit each GPU (the 70B shape needs 2 x 80 GiB GPUs at PP=2 in
bfloat16). `--replica` adds a row that runs PP=1 through the replica path at world size 1 (NCCL
on one GPU, the step broadcast and the stage runner, without CUDA graphs and async scheduling),
against the plain engine.

    python3 bench/pp.py --shape llama-3-8b --pp 1,2,4 --replica          # one GPU now: PP1 and the replica path
    python3 bench/pp.py --shape llama-3-70b --pp 2,4,8 --out bench/results/pp-h100x8.md
    python3 bench/pp.py --shape tiny --pp 1,2,4 --device cpu --dtype float32 --requests 32 --max-tokens 16
"""

import argparse
import gc
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from kvflock.worker.attention import select_attention_backend
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from kvflock.worker.tp import load_replica
from tp import SHAPES as TP_SHAPES  # bench/tp.py
from tp import decode_ms, throughput

# Four layers in the tiny shape, so that four stages each get one.
SHAPES = {**TP_SHAPES, "tiny": {**TP_SHAPES["tiny"], "num_hidden_layers": 4}}


def weight_bytes_per_rank(shape: dict, pp: int, tp: int, dtype: torch.dtype) -> float:
    """About what one rank's weights take: its stage's layers (the first stage's share, rounded
    up) plus the embedding and LM head, split by tensor parallelism."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    params = -(-layers // pp) * per_layer + shape["vocab_size"] * h * (2 if pp == 1 else 1)
    return params * dtype.itemsize / tp


def measure(config: EngineConfig, replica: bool, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    started = time.perf_counter()
    loaded = load_replica(config, select_attention_backend(config.torch_device())) if replica else None
    llm = LLM.from_engine(LLMEngine(config, loaded=loaded))
    row = {"start_s": time.perf_counter() - started}
    engine = llm.engine
    engine.warm_up()
    decode_ms(engine, 2, 16, 4, vocab)  # compile and autotune the kernels before timing
    row["decode_ms_b1"] = decode_ms(engine, 1, args.prompt_len, args.decode_steps, vocab)
    row["tokens_per_s"] = throughput(llm, args.requests, args.prompt_len, args.max_tokens, vocab)
    if engine.loaded.replica is not None:
        engine.loaded.replica.shutdown()
    del llm, engine, loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def fill_drain_share(pp: int, micro_batches: int) -> float:
    """The share of a step's micro-batch slots in which a stage waits for the pipeline to fill or drain."""
    return (pp - 1) / (micro_batches + pp - 1)


def report(args: argparse.Namespace, rows: dict[str, dict[str, float]], skipped: list[str]) -> str:
    base = next(iter(rows.values()))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [
        f"# Pipeline parallelism: {args.shape} (dummy weights), {args.dtype}, TP={args.tp}, {device}, {date.today()}",
        "",
        f"Prompts of {args.prompt_len} random tokens; decode latency is the median step time of one sequence "
        f"({args.decode_steps} steps); throughput: {args.requests} requests x {args.max_tokens} output tokens. "
        f"Ratios are against the first row (latency: first / this, higher is better). Fill/drain: "
        "(p - 1) / (m + p - 1) for batch 1 (m = 1) and full batches (m = p); idle: 1 - speedup / p at "
        f"{args.requests} requests. The plain engine (no replica) replays CUDA graphs and schedules asynchronously; "
        "a replica of several ranks (or --replica) does neither."
        + (" On the CPU the ranks share this machine's cores: a smoke check, not a scaling figure." if not
           args.device.startswith("cuda") else ""),
        "",
        f"| layout | start s | decode ms b=1 | x | fill/drain b=1 | output tok/s @{args.requests} | x "
        "| fill/drain full | idle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        pp = int(r["pp"])
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        lines.append(
            f"| {label} | {r['start_s']:.1f} | {r['decode_ms_b1']:.2f} "
            f"| {base['decode_ms_b1'] / r['decode_ms_b1']:.2f} "
            f"| {fill_drain_share(pp, 1):.0%} | {r['tokens_per_s']:.0f} | {speedup:.2f} "
            f"| {fill_drain_share(pp, pp):.0%} | {max(0.0, 1 - speedup / pp):.0%} |"
        )
    lines += [f"- skipped {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--pp", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")],
                        help="PP sizes, comma-separated; ratios are against the first")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every stage")
    parser.add_argument("--replica", action="store_true",
                        help="add PP=1 through the replica path (NCCL at world size 1 on a GPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (throughput)")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=16.0, help="per rank")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    cuda = args.device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else None
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else None
    dtype = getattr(torch, args.dtype)
    rows: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(shape))
        runs = [(pp, False) for pp in args.pp] + ([(1, True)] if args.replica else [])
        for pp, replica in runs:
            label = f"TP{args.tp}xPP{pp}" + (" replica" if replica else "")
            world = args.tp * pp
            if gpus is not None and world > gpus:
                skipped.append(f"{label}: needs {world} GPUs, this machine has {gpus}")
                continue
            weights = weight_bytes_per_rank(shape, pp, args.tp, dtype)
            if gpu_bytes is not None and weights + args.kv_cache_memory_gib * 2**30 > 0.9 * gpu_bytes:
                skipped.append(f"{label}: {weights / 2**30:.0f} GiB of weights and {args.kv_cache_memory_gib:.0f} "
                               f"GiB of KV cache per GPU do not fit {gpu_bytes / 2**30:.0f} GiB")
                continue
            config = EngineConfig(
                model=folder, load_format="dummy", tensor_parallel_size=args.tp, pipeline_parallel_size=pp,
                device=args.device, dtype=args.dtype, max_model_len=args.prompt_len + args.max_tokens + 8,
                max_num_seqs=args.requests, max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_memory_gib=args.kv_cache_memory_gib,
            )
            rows[label] = {"pp": pp, **measure(config, replica or world > 1, args, shape["vocab_size"])}
            print(f"{label}: {rows[label]}", flush=True)
    table = report(args, rows, skipped) if rows else "\n".join(["nothing ran:", *skipped]) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
