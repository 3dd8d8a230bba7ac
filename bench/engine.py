"""The engine on one GPU against transformers on the same weights, in one run.

1. Decode at batch 1: median time of a decode step (CUDA graphs with async scheduling, then
   without it, and eager for comparison), tokens/s and its fraction of the bandwidth limit
   (weight bytes / copy bandwidth measured here); beside it transformers' generate with a
   static cache on the same weights.
2. Offline throughput: --requests requests of --prompt-len prompt and --output-len output tokens,
   and a variant with prompt and output lengths each uniform in [100, 1024] (seeded); output
   tokens/s with and without async scheduling, beside transformers' continuous batching
   (generate_batch) on the same requests.
3. The top kernels by GPU time over decode steps at batch --profile-batch (eager, so that
   each kernel shows under its own name).

All requests ignore EOS, so both engines generate the same number of tokens.

    python bench/engine.py --out bench/results/engine-h100.md
    python bench/engine.py --shape tiny --requests 8 --skip-transformers   # quick check
"""

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from kvflock.worker.attention import AttentionMetadata
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from kernel_bench import copy_bandwidth  # bench/kernel_bench.py
from tp import SHAPES


def random_prompts(n: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for length in lengths[:n]]


def decode_steps_ms(engine: LLMEngine, prompts: list[list[int]], steps: int) -> list[float]:
    """Wall time of each step in which every sequence decodes (after their prefills)."""
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"decode-{i}-{random.random()}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        decoding = not engine.scheduler.waiting and all(
            s.num_computed_tokens > 0 and s.num_tokens - s.num_computed_tokens == 1 for s in engine.scheduler.running)
        started = time.perf_counter()
        engine.step()
        if decoding:
            times.append(1000 * (time.perf_counter() - started))
    return times


def graph_replay_ms(engine: LLMEngine, context: int) -> float:
    """GPU time of one batch-1 decode graph replay plus the LM head and argmax: the step
    without any of the host's work (scheduling, input packing, sampling bookkeeping)."""
    graphs = engine.runner.decode_graphs
    device = engine.device
    meta = AttentionMetadata(
        slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=device),
        block_tables=torch.ones((1, -(-context // engine.config.block_size)), dtype=torch.int32, device=device),
        context_lens=torch.tensor([context], dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=device),
        is_decode=True,
    )
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    model = engine.loaded.model

    def step() -> None:
        model.logits(graphs.run(ids, ids + context - 1, meta)).argmax(-1)

    with torch.inference_mode():
        for _ in range(5):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            step()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / 50


def run_requests(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> tuple[int, float]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - started


def profile_decode(engine: LLMEngine, batch: int, vocab: int, top: int = 12) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(batch, [256] * batch, vocab, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{i}", prompt, params)
    for _ in range(8):  # prefills and a few decodes before the window
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = ["| kernel | share of GPU time | calls | mean us |", "|---|---|---|---|"]
    for e in events[:top]:
        rows.append(f"| `{e.key[:90]}` | {e.self_device_time_total / total:.1%} | {e.count} | "
                    f"{e.self_device_time_total / max(e.count, 1):.1f} |")
    return rows


def transformers_model(folder: Path, llm: LLM, dtype: torch.dtype):  # noqa: ANN201 (transformers' type)
    """A transformers Llama with the engine's weights (its parameter names follow the HF checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    missing, _ = model.load_state_dict(llm.engine.loaded.model.state_dict(), strict=False, assign=True)
    if any("rotary" not in name for name in missing):
        raise RuntimeError(f"transformers' model has parameters the engine's lacks: {missing[:4]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config, device="cuda")
    return model.eval()


def transformers_decode(model, prompt: list[int], steps: int) -> float:  # noqa: ANN001
    """Tokens/s of generate with a static cache (prefill included, as ours in the same row)."""
    ids = torch.tensor([prompt], device="cuda")
    kwargs = dict(do_sample=False, cache_implementation="static", min_new_tokens=steps, max_new_tokens=steps,
                  pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # the same call, so that whatever it compiles is ready
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


def transformers_batch(model, prompts: list[list[int]], output_lens: list[int]) -> tuple[int, float]:  # noqa: ANN001
    """Continuous batching through transformers' manager, each request with its own length."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(output_lens), eos_token_id=-1, pad_token_id=0)
    with torch.inference_mode():
        manager = model.init_continuous_batching(generation_config=config)
        manager.start()
        started = time.perf_counter()
        for prompt, n in zip(prompts, output_lens):
            manager.add_request(prompt, max_new_tokens=n)
        tokens = 0
        for _ in prompts:
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("transformers' manager stopped before every request finished")
            tokens += len(result.generated_tokens)
        elapsed = time.perf_counter() - started
        manager.stop(block=True)
    return tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=256)
    parser.add_argument("--profile-batch", type=int, default=64)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None, help="default: gpu_memory_utilization")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6,
                        help="leaves room for transformers' copy of the weights and its cache")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-decode", action="store_true", help="no batch-1 decode section")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--workloads", default="fixed,varied", help="offline workloads to run: fixed, varied")
    parser.add_argument("--out", type=Path, help="also write the report here (markdown)")
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    vocab = shape["vocab_size"]
    folder = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    (folder / "config.json").write_text(json.dumps({**shape, "model_type": "llama", "max_position_embeddings": 4096,
                                                    "torch_dtype": "bfloat16"}))
    max_len = 2048
    llm = LLM(str(folder), load_format="dummy", dtype="bfloat16", max_model_len=max_len, max_num_seqs=args.requests,
              max_num_batched_tokens=8192, kv_cache_memory_gib=args.kv_cache_memory_gib,
              gpu_memory_utilization=args.gpu_memory_utilization)
    engine = llm.engine
    eager = LLMEngine(EngineConfig(**{**engine.config.model_dump(), "enforce_eager": True, "num_kv_blocks": 2048}),
                      loaded=engine.loaded)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.loaded.model.parameters())
    copy_gbs = copy_bandwidth()
    limit = copy_gbs * 1e9 / weight_bytes
    report = [f"# Engine on {torch.cuda.get_device_name()}, {date.today()}", "",
              f"{args.shape} dummy weights, bfloat16 ({weight_bytes / 1e9:.2f} GB), torch {torch.__version__}. "
              f"Copy bandwidth {copy_gbs:.0f} GB/s (read + write of a 2 GiB device copy), so one pass over the "
              f"weights bounds batch-1 decode at {limit:.1f} tokens/s.", ""]

    # 1. decode at batch 1
    prompt = random_prompts(1, [128], vocab, seed=1)
    ours_e2e = None
    if not args.skip_decode:
        decode_steps_ms(engine, prompt, 16)  # warm-up
        graph_ms = statistics.median(decode_steps_ms(engine, prompt, args.decode_steps))
        engine.async_scheduling = False
        sync_ms = statistics.median(decode_steps_ms(engine, prompt, args.decode_steps))
        engine.async_scheduling = True
        eager_ms = statistics.median(decode_steps_ms(eager, prompt, 64))
        gpu_ms = graph_replay_ms(engine, 256)
        started = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=args.decode_steps, ignore_eos=True))
        ours_e2e = args.decode_steps / (time.perf_counter() - started)
        report += [
            "## Decode, batch 1 (128-token prompt)", "",
            "| | ms per step | tokens/s | fraction of the bandwidth limit |", "|---|---|---|---|",
            f"| kvflock, CUDA graphs, async scheduling | {graph_ms:.2f} | {1000 / graph_ms:.1f} | "
            f"{1000 / graph_ms / limit:.2f} |",
            f"| kvflock, CUDA graphs, one step at a time | {sync_ms:.2f} | {1000 / sync_ms:.1f} | "
            f"{1000 / sync_ms / limit:.2f} |",
            f"| kvflock, eager, async scheduling | {eager_ms:.2f} | {1000 / eager_ms:.1f} | "
            f"{1000 / eager_ms / limit:.2f} |",
            f"| GPU time alone (graph replay, LM head, argmax; no host work) | {gpu_ms:.2f} | {1000 / gpu_ms:.1f} | "
            f"{1000 / gpu_ms / limit:.2f} |",
            f"| kvflock, {args.decode_steps} tokens end to end (prefill included) | | {ours_e2e:.1f} | |",
        ]
        print("\n".join(report), flush=True)

    # 2. offline throughput
    rng = random.Random(0)
    lengths = [rng.randint(100, 1024) for _ in range(args.requests)]
    all_workloads = {
        "fixed": (f"{args.requests} x ({args.prompt_len} in, {args.output_len} out)",
                  random_prompts(args.requests, [args.prompt_len] * args.requests, vocab, seed=2),
                  [args.output_len] * args.requests),
        "varied": (f"{args.requests} x (U[100,1024] in, U[100,1024] out), seed 0",
                   random_prompts(args.requests, lengths, vocab, seed=4), [rng.randint(100, 1024) for _ in lengths]),
    }
    workloads = {name: (prompts, outs) for key, (name, prompts, outs) in all_workloads.items()
                 if key in args.workloads.split(",")}
    def same_lengths(prompts: list[list[int]], seed: int) -> list[list[int]]:
        """Other prompts of the same lengths: an earlier run's are in the prefix cache."""
        return random_prompts(len(prompts), [len(p) for p in prompts], vocab, seed)

    # A first pass of each workload compiles what its shapes need (Triton specializations,
    # cuBLAS heuristics), so neither measured pass pays for it.
    for prompts, outs in workloads.values():
        run_requests(llm, same_lengths(prompts, seed=6), outs)
    ours = {name: run_requests(llm, *w) for name, w in workloads.items()}
    for name, (tokens, seconds) in ours.items():
        print(f"kvflock {name}: {tokens / seconds:.1f} output tokens/s ({tokens} tokens in {seconds:.1f} s)", flush=True)
    engine.async_scheduling = False
    ours_sync = {name: run_requests(llm, same_lengths(prompts, seed=5), outs)
                 for name, (prompts, outs) in workloads.items()}
    engine.async_scheduling = True
    for name, (tokens, seconds) in ours_sync.items():
        print(f"kvflock {name}, one step at a time: {tokens / seconds:.1f} output tokens/s", flush=True)

    # 3. profile
    profile = [] if args.skip_profile else profile_decode(eager, args.profile_batch, vocab)
    del eager
    gc.collect()

    # 4. transformers on the same weights
    theirs_decode, theirs = None, {}
    if not args.skip_transformers:
        model = transformers_model(folder, llm, torch.bfloat16)
        engine.runner.decode_graphs = None
        del llm, engine
        gc.collect()
        torch.cuda.empty_cache()
        if not args.skip_decode:
            theirs_decode = transformers_decode(model, prompt[0], args.decode_steps)
            print(f"transformers static-cache decode: {theirs_decode:.1f} tokens/s", flush=True)
        for name, w in workloads.items():
            try:
                theirs[name] = transformers_batch(model, *w)
                print(f"transformers {name}: {theirs[name][0] / theirs[name][1]:.1f} tokens/s", flush=True)
            except Exception as exc:  # report the baseline's failure, keep our figures
                print(f"transformers {name}: failed: {exc!r}", flush=True)

    if theirs_decode is not None and ours_e2e is not None:
        report.append(f"| transformers generate, static cache, same weights | | {theirs_decode:.1f} | "
                      f"{theirs_decode / limit:.2f} |")
        report.append(f"\nkvflock / transformers at batch 1, end to end: {ours_e2e / theirs_decode:.2f}x")
    report += ["", "## Offline throughput (output tokens/s)", "",
               "| workload | kvflock | kvflock, one step at a time | transformers generate_batch | ratio |",
               "|---|---|---|---|---|"]
    for name, (tokens, seconds) in ours.items():
        mine, sync = tokens / seconds, ours_sync[name][0] / ours_sync[name][1]
        if name in theirs:
            other = theirs[name][0] / theirs[name][1]
            report.append(f"| {name} | {mine:.0f} | {sync:.0f} | {other:.0f} | {mine / other:.1f}x |")
        else:
            report.append(f"| {name} | {mine:.0f} | {sync:.0f} | n/a | |")
    if profile:
        report += ["", f"## Top kernels, decode at batch {args.profile_batch} (eager, 20 steps, 256-token prompts)",
                   "", *profile]
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
