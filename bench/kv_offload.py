"""KV offload: time to first token when a long prefix is (a) in the GPU cache, (b) restored
from CPU memory, (c) restored from disk, (d) recomputed; and a multi-turn chat workload whose
KV outgrows the GPU pool, with offload on and off. One run, one model load.

    python bench/kv_offload.py                                   # Llama-3-8B shape, dummy bf16 weights, CUDA
    python bench/kv_offload.py --shape tiny --device cpu --prefixes 256 1024   # a smoke run
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from kvflock.worker.attention import select_attention_backend
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.model.loader import load
from kvflock.worker.runner import kv_bytes_per_block

SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=10000.0, rms_norm_eps=1e-5),
}
FIRST_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def ttft(engine: LLMEngine, prompt: list[int], params: SamplingParams = FIRST_TOKEN) -> float:
    """Seconds from submission to the first sampled token (the request then runs to its end)."""
    rid = f"r{random.random()}"
    start = time.perf_counter()
    engine.add_request(rid, prompt, params)
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.request_id == rid and out.outputs[0].token_ids:
                if engine.device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - start
    return first


def flood(engine: LLMEngine, rng: random.Random, vocab: int, tokens: int) -> None:
    """Push `tokens` tokens of unrelated prompts through, evicting older cached blocks."""
    chunk = min(4096, engine.max_model_len - 8)
    for _ in range(-(-tokens // chunk)):
        ttft(engine, [rng.randrange(vocab) for _ in range(chunk)])


def prefix_restores(loaded, args, vocab: int, disk_dir: Path) -> list[str]:
    rows = []
    pool_tokens = max(args.prefixes) + 4096
    base = dict(model=args.model_dir, load_format="dummy", max_model_len=max(args.prefixes) + 64,
                num_kv_blocks=pool_tokens // 16 + 1, max_num_batched_tokens=args.chunk)
    block_bytes = kv_bytes_per_block(loaded.config, 16, loaded.dtype)
    cpu_gib = (pool_tokens // 16 + 64) * block_bytes / 2**30
    via_cpu = LLMEngine(EngineConfig(**base, kv_offload_cpu_gib=cpu_gib), loaded=loaded)
    via_disk = LLMEngine(EngineConfig(**base, kv_offload_cpu_gib=4 * block_bytes / 2**30, kv_offload_disk_gib=2 * cpu_gib,
                                      kv_offload_disk_path=str(disk_dir)), loaded=loaded)
    rng = random.Random(0)
    for engine in (via_cpu, via_disk):  # compile kernels and fill caches before timing anything
        engine.warm_up()
        ttft(engine, [rng.randrange(vocab) for _ in range(max(args.prefixes))])
    for length in args.prefixes:
        prefix = [rng.randrange(vocab) for _ in range(length)]
        ask = lambda: prefix + [rng.randrange(vocab) for _ in range(16)]  # noqa: E731
        recompute = ttft(via_cpu, ask())
        gpu = ttft(via_cpu, ask())
        flood(via_cpu, rng, vocab, pool_tokens)
        restored_before = via_cpu.tiers.restored_blocks["cpu"]
        cpu = ttft(via_cpu, ask())
        assert via_cpu.tiers.restored_blocks["cpu"] > restored_before, "the prefix did not come back from CPU"

        ttft(via_disk, ask())
        flood(via_disk, rng, vocab, pool_tokens)
        restored_before = via_disk.tiers.restored_blocks["disk"]
        disk = ttft(via_disk, ask())
        from_disk = via_disk.tiers.restored_blocks["disk"] - restored_before
        rows.append(f"| {length} | {gpu * 1000:.1f} | {cpu * 1000:.1f} | {disk * 1000:.1f} ({from_disk} blocks) "
                    f"| {recompute * 1000:.1f} | {recompute / cpu:.1f}x | {recompute / disk:.2f}x |")
    return rows


def multi_turn(loaded, args, vocab: int, offload: bool) -> str:
    """Conversations whose KV outgrows the GPU pool; each turn's prompt extends the last."""
    rng = random.Random(1)
    gpu_tokens = args.conversations * args.turn_tokens * args.turns // 4
    block_bytes = kv_bytes_per_block(loaded.config, 16, loaded.dtype)
    settings = dict(model=args.model_dir, load_format="dummy", max_model_len=args.turns * (args.turn_tokens + args.answer_tokens) + 64,
                    num_kv_blocks=gpu_tokens // 16 + 1, max_num_batched_tokens=args.chunk, max_num_seqs=args.conversations)
    if offload:
        settings["kv_offload_cpu_gib"] = 4 * gpu_tokens // 16 * block_bytes / 2**30
    engine = LLMEngine(EngineConfig(**settings), loaded=loaded)
    history = [[] for _ in range(args.conversations)]
    ttfts, generated = [], 0
    params = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens, ignore_eos=True)
    start = time.perf_counter()
    for turn in range(args.turns):
        arrived, firsts = {}, {}
        for i, h in enumerate(history):
            h.extend(rng.randrange(vocab) for _ in range(args.turn_tokens))
            engine.add_request(f"c{i}-t{turn}", list(h), params)
            arrived[f"c{i}-t{turn}"] = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.perf_counter()
                if out.request_id not in firsts and out.outputs[0].token_ids:
                    firsts[out.request_id] = now - arrived[out.request_id]
                if out.finished:
                    i = int(out.request_id[1:].split("-")[0])
                    history[i].extend(out.outputs[0].token_ids)
                    generated += len(out.outputs[0].token_ids)
        ttfts.extend(firsts.values())
    elapsed = time.perf_counter() - start
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
    restored = engine.tiers.restored_blocks["cpu"] if engine.tiers else 0
    return (f"| {'on' if offload else 'off'} | {generated / elapsed:.1f} | {statistics.median(ttfts) * 1000:.1f} | "
            f"{p99 * 1000:.1f} | {engine.scheduler.prefix_hit_tokens} | {restored} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefixes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--chunk", type=int, default=4096, help="max_num_batched_tokens")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=512)
    parser.add_argument("--answer-tokens", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kv-offload-"))
    args.model_dir = str(work / "model")
    Path(args.model_dir).mkdir()
    shape = SHAPES[args.shape]
    (Path(args.model_dir) / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **shape}))
    config = EngineConfig(model=args.model_dir, load_format="dummy", device=args.device, dtype=args.dtype)
    loaded = load(config, select_attention_backend(config.torch_device()))
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else "CPU"

    print(f"KV offload, {args.shape} dummy weights, {args.dtype}, {device}, {date.today()}")
    print("\nTime to first token (ms) for a request whose prefix is cached where the column says:")
    print("| prefix tokens | GPU hit | CPU restore | disk restore | recompute | recompute/CPU | recompute/disk |")
    print("|---|---|---|---|---|---|---|")
    for row in prefix_restores(loaded, args, shape["vocab_size"], work / "disk"):
        print(row, flush=True)
    print(f"\nMulti-turn chat: {args.conversations} conversations x {args.turns} turns of {args.turn_tokens} new "
          f"prompt tokens and {args.answer_tokens} answer tokens; the GPU pool holds a quarter of their KV.")
    print("| offload | output tokens/s | TTFT p50 ms | TTFT p99 ms | prefix hit tokens | blocks restored from CPU |")
    print("|---|---|---|---|---|---|")
    for offload in (False, True):
        print(multi_turn(loaded, args, shape["vocab_size"], offload), flush=True)


if __name__ == "__main__":
    main()
