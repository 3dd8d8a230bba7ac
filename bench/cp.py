"""Context-parallel time to first token on dummy weights of a named model shape.

For each shape and CP size, in one run: the time to first token (median of --runs requests, each
a fresh random prompt, prefix caching off) of one prompt of each --prompt-len, prefilled in one
chunk, with its ratio to CP=1 measured in the same run (CP=1 / this: higher is better). CP sizes
default to 1 and every power of two the machine's GPUs hold (x --tp GPUs each). `--one-rank-cp`
adds a row that runs the context-parallel path on one rank (NCCL group of one): the cost of its
machinery with no partner to share the work. A shape whose weights do not fit a GPU at that TP
size is skipped and says so.

    python3 bench/cp.py --shape llama-3-8b,llama-3-70b --prompt-len 32768,131072 --one-rank-cp
    python3 bench/cp.py --shape llama-3-70b --tp 2 --cp 1,2,4            # 70B on 2, 4, 8 GPUs
    python3 bench/cp.py --device cpu --dtype float32 --shape tiny --prompt-len 512   # CPU smoke run
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
from kvflock.worker.tp import load_replica
from tp import SHAPES as TP_SHAPES  # bench/tp.py

# Room for the 128k-token prompts.
SHAPES = {name: {**shape, "max_position_embeddings": 262144} for name, shape in TP_SHAPES.items()}
ONE_RANK_CP = "1 (CP path)"


def weight_bytes(shape: dict, dtype: torch.dtype) -> int:
    h, i, layers, vocab = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], \
        shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return (layers * per_layer + 2 * vocab * h) * dtype.itemsize


def kv_gib(shape: dict, tokens: int, cp: int, tp: int, dtype: torch.dtype) -> float:
    """KV cache of one rank for `tokens` tokens (its 1/cp share of them), with room to spare."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv_heads = max(1, shape["num_key_value_heads"] // tp)
    per_token = shape["num_hidden_layers"] * 2 * kv_heads * head_dim * dtype.itemsize
    return 1.1 * per_token * (tokens // cp + 1024) / 2**30


def ttft_ms(engine: LLMEngine, prompt_len: int, runs: int, vocab: int) -> float:
    """Median time from a request's arrival to its first token, one request at a time."""
    gen = torch.Generator().manual_seed(prompt_len)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for run in range(runs):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        started = time.perf_counter()
        engine.add_request(f"ttft-{prompt_len}-{run}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure(folder: Path, cp: int | str, args: argparse.Namespace, shape: dict) -> dict[int, float]:
    longest = max(args.prompt_len)
    one_rank_cp = cp == ONE_RANK_CP
    size = 1 if one_rank_cp else int(cp)
    dtype = getattr(torch, args.dtype)
    config = EngineConfig(
        model=str(folder), load_format="dummy", device=args.device, dtype=args.dtype,
        tensor_parallel_size=args.tp, context_parallel_size=size, context_parallel_min_tokens=args.min_tokens,
        block_size=args.block_size, max_model_len=longest + 16, max_num_seqs=1, max_num_batched_tokens=longest,
        enable_prefix_caching=False, kv_cache_memory_gib=kv_gib(shape, longest, size, args.tp, dtype),
    )
    if one_rank_cp:
        loaded = load_replica(config, select_attention_backend(config.torch_device()), context_parallel=True)
        engine = LLMEngine(config, loaded=loaded)
    else:
        engine = LLMEngine(config)
    ttft_ms(engine, min(args.prompt_len), 1, shape["vocab_size"])  # compile and autotune before timing
    row = {n: ttft_ms(engine, n, args.runs, shape["vocab_size"]) for n in args.prompt_len}
    if engine.loaded.replica is not None:
        engine.loaded.replica.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def fits(shape: dict, args: argparse.Namespace) -> bool:
    if not args.device.startswith("cuda"):
        return True
    per_rank = weight_bytes(shape, getattr(torch, args.dtype)) / args.tp
    return per_rank < 0.8 * torch.cuda.get_device_properties(0).total_memory


def report(args: argparse.Namespace, results: dict[str, dict[int | str, dict[int, float]] | None]) -> str:
    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if args.device.startswith("cuda") \
        else "CPU"
    lines = [
        f"# Context parallelism: time to first token, {args.dtype}, TP={args.tp}, {device}, {date.today()}",
        "",
        f"One prompt of random tokens at a time, prefilled in one chunk (median of {args.runs}); chunks of at least "
        f"{args.min_tokens} tokens are split over the CP ranks. x: TTFT at CP=1 / TTFT here (higher is better).",
        "",
        "| shape | CP | ranks | " + " | ".join(f"TTFT ms {n} | x" for n in args.prompt_len) + " |",
        "|---|---|---|" + "---|---|" * len(args.prompt_len),
    ]
    for name, rows in results.items():
        if rows is None:
            lines.append(f"| {name} | skipped: its weights do not fit one GPU at TP={args.tp} |")
            continue
        base = rows[args.cp[0]]
        for cp, row in rows.items():
            ranks = args.tp * (1 if cp == ONE_RANK_CP else int(cp))
            cells = " | ".join(f"{row[n]:.0f} | {base[n] / row[n]:.2f}" for n in args.prompt_len)
            lines.append(f"| {name} | {cp} | {ranks} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--shape", default="llama-3-8b,llama-3-70b", type=lambda s: s.split(","),
                        help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--prompt-len", default="32768,131072", type=ints)
    parser.add_argument("--cp", default=None, type=ints,
                        help="CP sizes; default 1 and every power of two the GPUs hold; ratios against the first")
    parser.add_argument("--one-rank-cp", action="store_true", help="add the CP path on one rank (NCCL group of one)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks within each CP rank")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=None,
                        help="context_parallel_min_tokens; default the shortest --prompt-len (every prompt splits)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    args.min_tokens = args.min_tokens or min(args.prompt_len)
    if args.cp is None:
        gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 2
        args.cp = [n for n in (1, 2, 4, 8) if n * args.tp <= max(gpus, args.tp)]
    sizes: list[int | str] = [*args.cp, *([ONE_RANK_CP] if args.one_rank_cp else [])]

    results: dict[str, dict[int | str, dict[int, float]] | None] = {}
    for name in args.shape:
        shape = SHAPES[name]
        if not fits(shape, args):
            results[name] = None
            print(f"{name}: skipped, its weights do not fit one GPU at TP={args.tp}", flush=True)
            continue
        results[name] = {}
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "config.json").write_text(json.dumps(shape))
            for cp in sizes:
                results[name][cp] = measure(Path(folder), cp, args, shape)
                print(f"{name} CP={cp}: {results[name][cp]}", flush=True)
    table = report(args, results)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
