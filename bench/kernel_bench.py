"""Benchmarks of the Triton kernels against the GPU's copy bandwidth and torch SDPA, in one run.

    python bench/kernel_bench.py [--sweep] [--out results.md]

Decode attention (Llama-3-8B heads: 32 q, 8 kv, d=128, bf16, block 16) reports achieved
bandwidth (KV bytes read / time) beside a device-to-device copy measured in the same run,
and beside torch SDPA reading the same KV stored densely. Prefill reports causal TFLOP/s
beside SDPA. rms_norm, rotary and silu_and_mul report GB/s against the copy.

Decode calls are timed as CUDA-graph replays of calls that rotate over enough copies of their
inputs to defeat the 50 MB L2, so small cases measure HBM traffic, not launch gaps or cache.
`--sweep` first times tile/launch variants of the two attention kernels (for tuning).
"""

import argparse
import datetime
import math
import statistics
from collections.abc import Callable

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from kvflock.kernels import paged_attention
from kvflock.kernels.activation import silu_and_mul, silu_and_mul_ref
from kvflock.kernels.norm import rms_norm, rms_norm_ref
from kvflock.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from kvflock.kernels.rotary import rope_cos_sin_cache, rotary, rotary_ref

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
ROTATE_BYTES = 256 << 20  # inputs rotated per timed graph: 5x the H100's L2
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def graph_ms(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Median time of one call, from CUDA-graph replays of all `calls` in a row."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus written."""
    src = torch.randn(1 << 29, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def decode_inputs(batch: int, ctx: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A paged cache holding `batch` sequences of `ctx` tokens in shuffled blocks."""
    blocks = batch * -(-ctx // PAGE)
    cache = torch.empty(blocks + 1, 1, 2, PAGE, HKV, D, dtype=DTYPE, device="cuda").normal_(generator=gen)
    order = torch.randperm(blocks, device="cuda", generator=gen).to(torch.int32) + 1
    return {
        "q": torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda", generator=gen),
        "kv": cache[:, 0],
        "tables": order.view(batch, -1),
        "lens": torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
    }


def dense_from_paged(inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same K and V laid out densely for SDPA: q [b, hq, 1, d], k/v [b, hkv, ctx, d]."""
    blocks = inp["kv"][inp["tables"].long()]  # [b, m, 2, page, hkv, d]
    k = blocks[:, :, 0].flatten(1, 2).transpose(1, 2).contiguous()
    v = blocks[:, :, 1].flatten(1, 2).transpose(1, 2).contiguous()
    return inp["q"][:, :, None], k, v


def copies_for(nbytes: int) -> int:
    return max(1, min(32, math.ceil(ROTATE_BYTES / nbytes)))


def bench_decode(copy_gbs: float, free_bytes: int) -> list[str]:
    rows = ["| batch | context | KV GB | ours µs | ours GB/s | ours/copy | flash/copy | cudnn/copy | splits |",
            "|---|---|---|---|---|---|---|---|---|"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = D**-0.5
    for batch in (1, 8, 64, 256):
        for ctx in (512, 4096, 32768):
            kv_bytes = batch * ctx * HKV * D * 2 * DTYPE.itemsize
            n = copies_for(kv_bytes)
            inputs = [decode_inputs(batch, ctx, gen) for _ in range(n)]
            ours = graph_ms([
                lambda i=i: paged_decode_attention(i["q"], i["kv"], i["tables"], i["lens"], scale) for i in inputs
            ])
            splits = paged_attention._decode_num_splits(batch * HKV, inputs[0]["tables"].shape[1] * PAGE, torch.device("cuda"))
            ratios = {}
            if 2 * n * kv_bytes < free_bytes * 0.8:
                dense = [dense_from_paged(i) for i in inputs]
                for name, backend in SDPA_BACKENDS.items():
                    try:
                        with sdpa_kernel(backend):
                            ms = graph_ms([
                                lambda d=d: scaled_dot_product_attention(*d, scale=scale, enable_gqa=True) for d in dense
                            ])
                        ratios[name] = f"{kv_bytes / ms / 1e6 / copy_gbs:.2f}"
                    except RuntimeError as err:
                        ratios[name] = "n/a"
                        print(f"sdpa {name} b={batch} ctx={ctx}: {str(err).splitlines()[0][:100]}")
                del dense
            gbs = kv_bytes / ours / 1e6
            rows.append(
                f"| {batch} | {ctx} | {kv_bytes / 1e9:.3f} | {ours * 1e3:.1f} | {gbs:.0f} | {gbs / copy_gbs:.2f} "
                f"| {ratios.get('flash', 'skipped')} | {ratios.get('cudnn', 'skipped')} | {splits} |"
            )
            print(rows[-1], flush=True)
            del inputs
            torch.cuda.empty_cache()
    return rows


def prefill_inputs(batch: int, seq: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    t = batch * seq
    blocks = batch * -(-seq // PAGE)
    cache = torch.empty(blocks + 1, 1, 2, PAGE, HKV, D, dtype=DTYPE, device="cuda").normal_(generator=gen)
    return {
        "q": torch.randn(t, HQ, D, dtype=DTYPE, device="cuda", generator=gen),
        "kv": cache[:, 0],
        "tables": (torch.randperm(blocks, device="cuda", generator=gen).to(torch.int32) + 1).view(batch, -1),
        "cu": torch.arange(0, t + 1, seq, dtype=torch.int32, device="cuda"),
        "lens": torch.full((batch,), seq, dtype=torch.int32, device="cuda"),
    }


def run_prefill(i: dict[str, torch.Tensor]) -> torch.Tensor:
    return paged_prefill_attention(i["q"], i["q"], i["q"], i["kv"], i["tables"], i["cu"], i["lens"], D**-0.5)


def bench_prefill() -> list[str]:
    rows = ["| batch x seq | ours TFLOP/s | flash TFLOP/s | cudnn TFLOP/s | ours/flash |", "|---|---|---|---|---|"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for batch, seq in ((16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)):
        inp = prefill_inputs(batch, seq, gen)
        flops = 4 * batch * HQ * D * seq * seq / 2  # causal: half of QK^T and PV
        tflops = {"ours": flops / triton.testing.do_bench(lambda: run_prefill(inp), return_mode="median") / 1e9}
        q = inp["q"].view(batch, seq, HQ, D).transpose(1, 2)
        blocks = inp["kv"][inp["tables"].long()]
        k = blocks[:, :, 0].flatten(1, 2).transpose(1, 2).contiguous()
        v = blocks[:, :, 1].flatten(1, 2).transpose(1, 2).contiguous()
        for name, backend in SDPA_BACKENDS.items():
            # A backend without GQA support gets K and V repeated to every query head.
            for kk, vv, gqa in ((k, v, True), (k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1), False)):
                try:
                    with sdpa_kernel(backend):
                        ms = triton.testing.do_bench(
                            lambda: scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa),
                            return_mode="median",
                        )
                    tflops[name] = flops / ms / 1e9
                    break
                except RuntimeError as err:
                    print(f"sdpa {name} {batch}x{seq} gqa={gqa}: {str(err).splitlines()[0][:100]}")
        flash = tflops.get("flash")
        rows.append(
            f"| {batch} x {seq} | {tflops['ours']:.0f} | {flash or float('nan'):.0f} | "
            f"{tflops.get('cudnn', float('nan')):.0f} | {tflops['ours'] / flash if flash else float('nan'):.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_pointwise(copy_gbs: float) -> list[str]:
    """Llama-3-8B shapes for 8192 tokens, timed against the torch references (eager)."""
    rows = ["| kernel | bytes MB | ours µs | ours GB/s | ours/copy | torch eager µs |", "|---|---|---|---|---|---|"]
    t, hidden, inter = 8192, 4096, 14336
    x = torch.randn(t, hidden, dtype=DTYPE, device="cuda")
    residual, w = torch.randn_like(x), torch.randn(hidden, dtype=DTYPE, device="cuda")
    gate_up = torch.randn(t, 2 * inter, dtype=DTYPE, device="cuda")
    qkv = torch.randn(t, HQ + 2 * HKV, D, dtype=DTYPE, device="cuda")
    q, k = qkv[:, :HQ], qkv[:, HQ : HQ + HKV]
    cache = rope_cos_sin_cache(D, 131072, 500000.0, device="cuda")
    positions = torch.randint(0, 131072, (t,), device="cuda")
    cases = [
        ("rms_norm + residual", 5 * x.numel() * 2, lambda: rms_norm(x, w, 1e-5, residual), lambda: rms_norm_ref(x, w, 1e-5, residual)),
        ("silu_and_mul", 3 * t * inter * 2, lambda: silu_and_mul(gate_up), lambda: silu_and_mul_ref(gate_up)),
        ("rotary", 2 * t * (HQ + HKV) * D * 2 + t * D * 4, lambda: rotary(q, k, positions, cache), lambda: rotary_ref(q, k, positions, cache)),
    ]
    for name, nbytes, ours, ref in cases:
        ms = triton.testing.do_bench(ours, return_mode="median")
        ref_ms = triton.testing.do_bench(ref, return_mode="median")
        gbs = nbytes / ms / 1e6
        rows.append(f"| {name} | {nbytes / 1e6:.0f} | {ms * 1e3:.1f} | {gbs:.0f} | {gbs / copy_gbs:.2f} | {ref_ms * 1e3:.1f} |")
        print(rows[-1], flush=True)
    return rows


def sweep_decode(batch: int, ctx: int, variants: list[tuple[dict[str, int] | None, int | None]]) -> None:
    """Time decode at one shape for each (tile config or default, split count or default)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    kv_bytes = batch * ctx * HKV * D * 4
    inputs = [decode_inputs(batch, ctx, gen) for _ in range(copies_for(kv_bytes))]
    default = paged_attention._decode_config
    for config, splits in variants:
        paged_attention._decode_config = default if config is None else (lambda *_, c=config: c)
        ms = graph_ms([
            lambda i=i: paged_decode_attention(i["q"], i["kv"], i["tables"], i["lens"], D**-0.5, num_splits=splits)
            for i in inputs
        ])
        print(f"decode b={batch} ctx={ctx} splits={splits} config={config or 'default'}: "
              f"{ms * 1e3:.1f} µs {kv_bytes / ms / 1e6:.0f} GB/s", flush=True)
    paged_attention._decode_config = default


def sweep() -> None:
    """Time tile/launch variants and split counts of the attention kernels (tuning aid)."""
    tiles = [{"BLOCK_N": n, "num_warps": w, "num_stages": st} for n, w, st in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (32, 2, 4))]
    sweep_decode(64, 4096, [(t, None) for t in tiles])
    sweep_decode(1, 32768, [(t, None) for t in tiles] + [(None, s) for s in (16, 32, 64, 128)])
    for batch, ctx in ((1, 4096), (1, 512), (8, 512), (8, 4096)):
        sweep_decode(batch, ctx, [(None, s) for s in (None, 1, 2, 4, 8, 16, 32, 64)])
    gen = torch.Generator(device="cuda").manual_seed(3)
    inp = prefill_inputs(4, 4096, gen)
    flops = 4 * 4 * HQ * D * 4096 * 4096 / 2
    default = paged_attention._prefill_config
    for block_m, block_n, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 128, 4, 3), (64, 128, 4, 4)):
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
        paged_attention._prefill_config = lambda *_, c=config: c
        try:
            ms = triton.testing.do_bench(lambda: run_prefill(inp), return_mode="median")
            print(f"prefill 4x4096 {config}: {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        except Exception as err:  # an out-of-resources variant is a result, not a failure
            print(f"prefill 4x4096 {config}: {type(err).__name__}", flush=True)
    paged_attention._prefill_config = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time kernel variants first")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.sweep:
        sweep()
    copy_gbs = copy_bandwidth()
    device = torch.cuda.get_device_name()
    header = [f"device: {device}; date: {datetime.date.today()}; torch {torch.__version__}; triton {triton.__version__}",
              f"copy bandwidth (device-to-device, read + write): {copy_gbs:.0f} GB/s", ""]
    print("\n".join(header), flush=True)
    free_bytes, _ = torch.cuda.mem_get_info()
    tables = ["## Decode attention", *bench_decode(copy_gbs, free_bytes), "", "## Prefill attention (causal, no prefix)",
              *bench_prefill(), "", "## Pointwise kernels", *bench_pointwise(copy_gbs)]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(header + tables) + "\n")


if __name__ == "__main__":
    main()
