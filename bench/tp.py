"""Tensor-parallel scaling on dummy weights of a named model shape.

For each TP size, in one run: decode latency (median ms per step once every sequence is
decoding) at batch 1 and 32, and output throughput (tokens/s) of 256 requests, each with
its ratio to the first size given (normally 1). All requests use random prompts of
--prompt-len tokens and generate exactly --max-tokens tokens (EOS ignored).

    python bench/tp.py --shape llama-3-8b --tp 1,2,4,8 --out bench/results/tp-h200x8.md
    python bench/tp.py --shape tiny --tp 1,2 --device cpu --dtype float32     # CPU smoke run
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

from kvflock.worker.config import SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM

_LLAMA_3 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 8192, "num_key_value_heads": 8}
SHAPES = {
    "llama-3-8b": {**_LLAMA_3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32},
    "llama-3-70b": {**_LLAMA_3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64},
    "tiny": {**_LLAMA_3, "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 8, "num_key_value_heads": 2},
}


def decode_ms(engine: LLMEngine, batch: int, prompt_len: int, steps: int, vocab: int) -> float:
    """Median wall time of a step in which all `batch` sequences decode one token."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"decode-{batch}-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        decoding = all(s.num_computed_tokens > 0 and s.num_tokens - s.num_computed_tokens == 1
                       for s in engine.scheduler.running) and not engine.scheduler.waiting
        started = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def throughput(llm: LLM, requests: int, prompt_len: int, max_tokens: int, vocab: int) -> float:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(requests)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - started)


def measure(folder: Path, tp: int, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    started = time.perf_counter()
    llm = LLM(str(folder), load_format="dummy", tensor_parallel_size=tp, device=args.device, dtype=args.dtype,
              max_model_len=args.prompt_len + args.max_tokens + 8, max_num_seqs=args.requests,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_gib=args.kv_cache_memory_gib)
    row = {"start_s": time.perf_counter() - started}
    llm.engine.warm_up()
    decode_ms(llm.engine, 2, 16, 4, vocab)  # compile and autotune the kernels before timing
    row["decode_ms_b1"] = decode_ms(llm.engine, 1, args.prompt_len, args.decode_steps, vocab)
    row["decode_ms_b32"] = decode_ms(llm.engine, 32, args.prompt_len, args.decode_steps, vocab)
    row["tokens_per_s"] = throughput(llm, args.requests, args.prompt_len, args.max_tokens, vocab)
    if llm.engine.loaded.replica is not None:
        llm.engine.loaded.replica.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def report(args: argparse.Namespace, rows: dict[int, dict[str, float]]) -> str:
    base = rows[args.tp[0]]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [
        f"# Tensor parallelism: {args.shape} (dummy weights), {args.dtype}, {device}, {date.today()}",
        "",
        f"Prompts of {args.prompt_len} random tokens; decode latency is the median step time once all "
        f"sequences decode ({args.decode_steps} steps); throughput: {args.requests} requests x {args.max_tokens} "
        f"output tokens. Ratios are against TP={args.tp[0]} (latency: TP={args.tp[0]} / this, higher is better).",
        "",
        "| TP | start s | decode ms b=1 | x | decode ms b=32 | x | output tok/s @256 | x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tp, r in rows.items():
        lines.append(
            f"| {tp} | {r['start_s']:.1f} | {r['decode_ms_b1']:.2f} | {base['decode_ms_b1'] / r['decode_ms_b1']:.2f} "
            f"| {r['decode_ms_b32']:.2f} | {base['decode_ms_b32'] / r['decode_ms_b32']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tp", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")],
                        help="TP sizes, comma-separated; ratios are against the first")
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
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(shape))
        for tp in args.tp:
            rows[tp] = measure(Path(folder), tp, args, shape["vocab_size"])
            print(f"TP={tp}: {rows[tp]}", flush=True)
    table = report(args, rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
