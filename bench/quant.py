"""Quantization: decode speed and offline throughput of fp8 (W8A8) and int8/int4 (weight-only)
against bf16, and greedy agreement, in one run.

    python bench/quant.py [--out bench/results/quantization-h100.md]   # GPU: all parts (about 5 minutes)
    python bench/quant.py --sweep                                       # also time quant_matmul launch variants
    python bench/quant.py --smoke                                       # tiny settings; on CPU only the agreement part

Decode: one decode step of a Llama-3-8B-shaped model (dummy weights: bf16, fp8 e4m3 per channel
with per-token activations, int8 per channel, int4 in groups of 128) for batch 1, 4, 16 and 64 at
a context of 128 tokens, replayed as a CUDA graph, reported as tokens/s and as a fraction of that
format's bandwidth limit: (bytes one step must read: the weights with their scales and zero
points, plus the KV cache) / the device-to-device copy bandwidth measured in the same run.

Offline throughput: the whole engine (`LLM.generate`) on 256 requests x (512 prompt, 256 output
tokens, EOS ignored) with the same dummy weights in bf16, fp8 and int4, one after the other in the
same process, output tokens/s. Each format first runs 256 other prompts for 8 tokens, which
compiles what the shapes need, then the timed pass.

Agreement: SmolLM2-135M-Instruct (the demo model) answers the 32 chat prompts of
bench/offline.py greedily, unquantized and quantized in memory by round-to-nearest (int8 per
channel; int4 in groups of 64, since its 576 hidden features are not a multiple of 128).
Reports the share of prompts with identical output and the mean fraction of tokens before the
first difference. On CPU it runs in float32 through the torch reference path.
"""

import argparse
import datetime
import gc
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from kernel_bench import copy_bandwidth  # bench/kernel_bench.py
from offline import make_conversations  # bench/offline.py

from kvflock.kernels import quant_matmul as qm
from kvflock.worker.attention import AttentionMetadata, select_attention_backend
from kvflock.worker.config import ModelConfig, SamplingParams
from kvflock.worker.llm import LLM
from kvflock.worker.model.loader import load_model
from kvflock.worker.model.quant import QUANTIZED_PROJECTIONS, RTN_SPECS, QuantSpec, quantize_rtn, replace_linears
from kvflock.kernels.fp8_matmul import fp8_supported
from kvflock.worker.model.source import ModelSource
from kvflock.worker.runner import allocate_kv_cache

LLAMA3_8B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192,
)
TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
)
FORMATS: dict[str, QuantSpec | None] = {"bf16": None, "fp8": RTN_SPECS["fp8"], "int8": RTN_SPECS["int8"],
                                        "int4": RTN_SPECS["int4"]}
BLOCK_SIZE = 16


def graph_ms(fn, replays: int = 30) -> float:
    """Median ms of `fn` replayed as a CUDA graph (eagerly if it cannot be captured)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError as err:  # something in the step syncs with the host: time it eagerly
        print(f"CUDA graph capture failed ({str(err).splitlines()[0][:80]}); timing eagerly", flush=True)
        run = fn
    run()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the weights: all but the embedding table (only a few of
    its rows are looked up), unless the LM head shares it."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if tied or name != "model.embed_tokens.weight")


def decode_step(model: torch.nn.Module, cfg: ModelConfig, batch: int, context: int):
    """A decode step of `batch` sequences with `context` tokens each, as a closure."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    kv = allocate_kv_cache(cfg, batch * blocks_per_seq + 1, BLOCK_SIZE, torch.bfloat16, torch.device("cuda"))
    tables = (torch.arange(batch * blocks_per_seq, dtype=torch.int32, device="cuda") + 1).view(batch, -1)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    slots = tables[:, -1].long() * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
    meta = AttentionMetadata(slots, tables, lens, torch.arange(batch + 1, dtype=torch.int32, device="cuda"), True)
    ids = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    positions = torch.full((batch,), context - 1, device="cuda")
    kv_bytes = batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    return (lambda: model.logits(model(ids, positions, kv, meta))), kv_bytes


@torch.inference_mode()
def bench_decode(cfg: ModelConfig, copy_gbs: float, batches: tuple[int, ...], context: int) -> list[str]:
    rows = ["| format | weights GB | batch | step ms | tokens/s | limit tokens/s | fraction of limit | vs bf16 |",
            "|---|---|---|---|---|---|---|---|"]
    backend = select_attention_backend(torch.device("cuda"))
    bf16_rate: dict[int, float] = {}
    for fmt, spec in FORMATS.items():
        if spec is not None and spec.fp8 and not fp8_supported(torch.device("cuda")):
            print(f"{fmt}: skipped, needs CUDA capability 8.9+", flush=True)
            continue
        model = load_model(ModelSource("dummy", Path(".")), cfg, torch.bfloat16, torch.device("cuda"), backend,
                           quantization=spec)
        wbytes = weight_bytes(model)
        for batch in batches:
            step, kv_bytes = decode_step(model, cfg, batch, context)
            ms = graph_ms(step)
            rate = batch / ms * 1e3
            limit = batch / ((wbytes + kv_bytes) / copy_gbs / 1e6) * 1e3
            bf16_rate.setdefault(batch, rate)
            rows.append(f"| {fmt} | {wbytes / 1e9:.2f} | {batch} | {ms:.2f} | {rate:.0f} | {limit:.0f} | "
                        f"{rate / limit:.2f} | {rate / bf16_rate[batch]:.2f}x |")
            print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def projections(model: torch.nn.Module):
    """(name, parent module, projection) of every quantizable projection."""
    for i, layer in enumerate(model.model.layers):
        for path in QUANTIZED_PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            yield f"{i}.{path}", parent, getattr(parent, name)


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else len(a)


def bench_agreement(device: str, dtype: str, num_prompts: int, max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    specs = {"int8 (per channel)": QuantSpec(8, -1), "int4 (groups of 64)": QuantSpec(4, 64)}
    rows = ["| format | identical outputs | mean fraction before first difference |", "|---|---|---|"]
    # One engine; no prefix caching, so no KV computed under other weights is reused.
    llm = LLM("demo", device=device, dtype=dtype, max_model_len=1024, max_num_seqs=num_prompts,
              enable_prefix_caching=False)
    model = llm.engine.loaded.model
    prompts = [llm.apply_chat_template(c) for c in make_conversations(num_prompts)]
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    plain = {name: (parent, module) for name, parent, module in projections(model)}
    for name, spec in specs.items():
        replace_linears(model, spec, triton=model.model.norm.triton, quantize=True)
        model.fuse_projections()
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        for key, (parent, module) in plain.items():
            setattr(parent, key.rsplit(".", 1)[1], module)
        model.fuse_projections()
        same = sum(o == r for o, r in zip(outputs, reference))
        before = statistics.mean(first_difference(o, r) / max(len(r), 1) for o, r in zip(outputs, reference))
        rows.append(f"| {name} | {same}/{len(reference)} ({same / len(reference):.0%}) | {before:.2f} |")
        print(rows[-1], flush=True)
    return rows


def sweep(cfg: ModelConfig) -> None:
    """Time quant_matmul launch variants on the model's projection shapes (tuning aid for
    kvflock.kernels.quant_matmul.CONFIGS)."""
    default = qm.launch_config
    shapes = {"qkv": (cfg.hidden_size, 6144), "o": (4096, cfg.hidden_size),
              "gate_up": (cfg.hidden_size, 2 * cfg.intermediate_size), "down": (cfg.intermediate_size, cfg.hidden_size)}
    variants = [None] + [{"BLOCK_N": n, "SPLIT_K": s, "num_warps": w, "num_stages": st}
                         for n, s, w, st in ((32, 0, 4, 4), (128, 0, 4, 4), (64, 1, 4, 4), (64, 0, 8, 4),
                                             (128, 0, 8, 3), (64, 0, 4, 2), (256, 0, 8, 3))]
    for name, spec in (("int8", RTN_SPECS["int8"]), ("int4", RTN_SPECS["int4"])):
        for shape, (k, n) in shapes.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            packed = quantize_rtn(w, spec).pack()
            nbytes = sum(t.numel() * t.element_size() for t in (packed.words, packed.scales, packed.zeros))
            bf16_x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            bf16_ms = graph_ms(lambda: torch.matmul(bf16_x, w.t()))
            print(f"bf16 {shape} m=1: {bf16_ms * 1e3:.1f} µs {w.numel() * 2 / bf16_ms / 1e6:.0f} GB/s", flush=True)
            for m in (1, 4, 16, 64, 256):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for variant in variants:
                    # SPLIT_K 0 in a variant keeps the table's split
                    changes = {key: v for key, v in (variant or {}).items() if not (key == "SPLIT_K" and v == 0)}
                    qm.launch_config = lambda *a, changes=changes: {**default(*a), **changes}
                    ms = graph_ms(lambda: qm.quant_matmul(x, packed.words, packed.scales, packed.zeros,
                                                          spec.bits, spec.group_size))
                    print(f"{name} {shape} m={m} {variant or 'table'}: {ms * 1e3:.1f} µs {nbytes / ms / 1e6:.0f} GB/s",
                          flush=True)
    qm.launch_config = default


def bench_offline(cfg: ModelConfig, requests: int, prompt_len: int, output_len: int) -> list[str]:
    """Output tokens/s of the engine for bf16, fp8 and int4, one format after the other."""
    folder = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": 4096,
          "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(hf))
    rng = random.Random(0)
    warm = [[rng.randrange(cfg.vocab_size) for _ in range(prompt_len)] for _ in range(requests)]
    timed = [[rng.randrange(cfg.vocab_size) for _ in range(prompt_len)] for _ in range(requests)]
    rows = ["| format | output tokens/s | vs bf16 |", "|---|---|---|"]
    base = None
    for fmt in ("bf16", "fp8", "int4"):
        if fmt == "fp8" and not fp8_supported(torch.device("cuda")):
            print("fp8: skipped, needs CUDA capability 8.9+", flush=True)
            continue
        llm = LLM(str(folder), load_format="dummy", dtype="bfloat16", quantization=None if fmt == "bf16" else fmt,
                  max_model_len=prompt_len + output_len + 16, max_num_seqs=requests, max_num_batched_tokens=8192)
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        torch.cuda.synchronize()
        started = time.perf_counter()
        outputs = llm.generate(timed, params)
        rate = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - started)
        base = base or rate
        rows.append(f"| {fmt} | {rate:.0f} | {rate / base:.2f}x |")
        print(rows[-1], flush=True)
        del llm, outputs
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (a check that it runs)")
    parser.add_argument("--sweep", action="store_true", help="time quant_matmul tile variants first")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt in the agreement part")
    parser.add_argument("--skip-agreement", action="store_true",
                        help="decode speed only (e.g. where the SmolLM2 package is not installed)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    num_prompts, max_tokens = (4, 8) if args.smoke else (args.num_prompts, args.max_tokens)
    cfg = TINY if args.smoke else LLAMA3_8B
    if cuda:
        import triton

        device = f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}"
    header = [f"device: {device}; date: {datetime.date.today()}", ""]
    print("\n".join(header), flush=True)
    tables: list[str] = []
    if cuda:
        if args.sweep:
            sweep(cfg)
        copy_gbs = copy_bandwidth()
        tables += [f"## Decode, {'tiny' if args.smoke else 'Llama-3-8B'}-shaped dummy weights, context 128, "
                   f"CUDA graph per step", f"copy bandwidth (device-to-device, read + write): {copy_gbs:.0f} GB/s", ""]
        print("\n".join(tables), flush=True)
        tables += bench_decode(cfg, copy_gbs, (1, 4, 16, 64), 128)
        requests, prompt_len, output_len = (8, 32, 16) if args.smoke else (256, 512, 256)
        offline = ["", f"## Offline throughput, {requests} requests x ({prompt_len} prompt, {output_len} output tokens), "
                   "whole engine", ""]
        print("\n".join(offline), flush=True)
        tables += offline + bench_offline(cfg, requests, prompt_len, output_len)
    else:
        tables += ["## Decode", "skipped: needs a CUDA device"]
        print(tables[-1])
    if args.skip_agreement:
        if args.out:
            Path(args.out).write_text("\n".join(header + tables) + "\n")
        return
    dtype = "bfloat16" if cuda else "float32"
    started = time.perf_counter()
    agreement = [f"## Greedy agreement with unquantized SmolLM2-135M-Instruct ({num_prompts} prompts, up to "
                 f"{max_tokens} tokens, {dtype}, {'Triton kernels' if cuda else 'torch reference path'})", ""]
    print("\n".join(agreement), flush=True)
    tables += ["", *agreement, *bench_agreement("cuda" if cuda else "cpu", dtype, num_prompts, max_tokens)]
    print(f"(agreement part: {time.perf_counter() - started:.0f} s)")
    if args.out:
        Path(args.out).write_text("\n".join(header + tables) + "\n")


if __name__ == "__main__":
    main()
