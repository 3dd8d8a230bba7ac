"""The fleet simulator's answers at 10, 100, 1,000 and 10,000 GPUs: prefix-aware routing against
round robin, one pool against length-class pools (short prompts to a pool of cheaper cards), and
failures on and off; TTFT p50/p99, throughput, GPU-hours per million output tokens and the prefix
hit rate, as a markdown table and matplotlib PNGs in --out.

    python -P bench/fleetsim/run.py --out bench/results/fleetsim
    python -P bench/fleetsim/run.py --validate        # against bench/results/fleet-cpu.md

How large fleets stay within minutes of CPU: the fleet is cut into cells of --cell-gpus GPUs, each
behind its own router with its own autoscaled pools and its own share of the sessions (sessions
are hashed to cells, and an InferenceService holds at most 1,000 replicas anyway). Cells are
independent and identically loaded, so a uniform sample of --sample-cells of them estimates every
per-request figure (TTFT percentiles, hit rate) and every ratio (GPU-hours per token) of the whole
fleet; the table says how many GPUs were simulated for each row. The load is per GPU
(--sessions-per-gpu), so it grows with the fleet.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvflock.operator.crd import AutoscalingSpec  # noqa: E402

from fleetsim.cost_model import H100_RESTORE_SECONDS_PER_BLOCK, h100  # noqa: E402
from fleetsim.fleet import Fleet, FleetSpec, PoolSpec, Result, percentile  # noqa: E402
from fleetsim.replica import EngineParams  # noqa: E402
from fleetsim.trace import Trace, TraceSpec  # noqa: E402

H100_PARAMS = EngineParams(cpu_blocks=60_000, restore_seconds_per_block=H100_RESTORE_SECONDS_PER_BLOCK)


@dataclass(frozen=True)
class Scenario:
    name: str
    policy: str = "prefix-aware"
    length_pools: bool = False
    failures: bool = False


SCENARIOS = (
    Scenario("prefix-aware, one pool"),
    Scenario("round robin, one pool", policy="round-robin"),
    Scenario("prefix-aware, length pools", length_pools=True),
    Scenario("prefix-aware, one pool, failures", failures=True),
)


@dataclass
class Row:
    scenario: str
    gpus: int
    simulated_gpus: int
    requests: int
    ttft_p50: float
    ttft_p99: float
    tokens_per_s_per_gpu: float
    gpu_hours_per_m_tokens: float
    hit_rate: float
    retried: int
    cut: int
    seconds: float  # CPU time of the simulation


def autoscaling(replicas: int) -> AutoscalingSpec:
    """Hold 32 sequences per replica (half of max_num_seqs 64), between a quarter and four times
    the starting size; scale-in after a minute of low load."""
    return AutoscalingSpec(enabled=True, minReplicas=max(1, replicas // 4), maxReplicas=min(1000, 4 * replicas),
                           target=32, scaleDownStabilizationSeconds=60)


def pools(scenario: Scenario, gpus: int, args: argparse.Namespace) -> tuple[PoolSpec, ...]:
    if not scenario.length_pools:
        return (PoolSpec("all", gpus, H100_PARAMS, autoscaling=autoscaling(gpus)),)
    # The cheaper card's figures are assumptions (see docs/fleetsim.md), set by the flags.
    cheap = EngineParams(kv_blocks=args.cheap_kv_blocks, time_scale=args.cheap_slowdown)
    short = max(1, round(gpus * args.short_gpu_share))
    long = max(1, gpus - short)
    return (PoolSpec("short", short, cheap, args.cheap_price, 0, args.short_below, autoscaling(short)),
            PoolSpec("long", long, H100_PARAMS, 1.0, args.short_below, None, autoscaling(long)))


def simulate(scenario: Scenario, gpus: int, args: argparse.Namespace) -> Row:
    cells = math.ceil(gpus / args.cell_gpus)
    cell_gpus = math.ceil(gpus / cells)
    sampled = min(cells, args.sample_cells)
    began = time.process_time()
    results: list[Result] = []
    # Which cells: a uniform sample, so that each fleet size sees its own cells' traffic.
    for cell in random.Random(f"{args.seed}/{gpus}").sample(range(cells), sampled):
        spec = TraceSpec(duration_s=args.duration, sessions_per_s=args.sessions_per_gpu * cell_gpus, bursty=args.bursty,
                         failures=(args.duration / 3, 2 * args.duration / 3) if scenario.failures else (),
                         seed=args.seed * 100_003 + cell)
        fleet = FleetSpec(pools(scenario, cell_gpus, args), scenario.policy)  # type: ignore[arg-type]
        results.append(Fleet(fleet, Trace(spec), h100(), seed=args.seed + cell).run())
    ttfts = sorted(t for r in results for t in r.ttfts())
    tokens = sum(r.output_tokens for r in results)
    gpu_s = sum(r.gpu_seconds for r in results)
    looked_up = sum(r.blocks_looked_up for r in results)
    return Row(scenario.name, gpus, sampled * cell_gpus, sum(len(r.requests) for r in results),
               percentile(ttfts, 0.5), percentile(ttfts, 0.99), tokens / args.duration / (sampled * cell_gpus),
               gpu_s / 3600 / max(tokens / 1e6, 1e-9), sum(r.blocks_hit + r.blocks_restored for r in results)
               / max(1, looked_up), sum(r.retried for r in results), sum(r.cut_streams for r in results),
               time.process_time() - began)


def table(rows: list[Row]) -> str:
    lines = ["| GPUs | simulated | scenario | requests | TTFT p50 s | TTFT p99 s | output tok/s per GPU |"
             " GPU-h per M tokens | prefix hit rate | retried | cut streams | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.gpus} | {r.simulated_gpus} | {r.scenario} | {r.requests} | {r.ttft_p50:.3f} |"
                     f" {r.ttft_p99:.3f} | {r.tokens_per_s_per_gpu:.0f} | {r.gpu_hours_per_m_tokens:.3f} |"
                     f" {r.hit_rate:.1%} | {r.retried} | {r.cut} | {r.seconds:.1f} |")
    return "\n".join(lines)


def plot(rows: list[Row], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for field, label, name in (("ttft_p99", "TTFT p99 (s)", "ttft-p99.png"),
                               ("gpu_hours_per_m_tokens", "GPU-hours per million output tokens", "gpu-hours.png"),
                               ("hit_rate", "prefix hit rate", "hit-rate.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for scenario in dict.fromkeys(r.scenario for r in rows):
            points = [(r.gpus, getattr(r, field)) for r in rows if r.scenario == scenario]
            ax.plot(*zip(*points), marker="o", label=scenario)
        ax.set_xscale("log")
        ax.set_xlabel("GPUs in the fleet")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fleetsim"))
    parser.add_argument("--gpus", default="10,100,1000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--duration", type=float, default=60.0, help="simulated seconds of arrivals")
    parser.add_argument("--sessions-per-gpu", type=float, default=3.0, help="new sessions per second per GPU")
    parser.add_argument("--bursty", action="store_true", help="arrival rate alternates x3 and x1/3 every 10 s")
    parser.add_argument("--cell-gpus", type=int, default=50, help="GPUs behind one router")
    parser.add_argument("--sample-cells", type=int, default=1, help="cells simulated per fleet size")
    parser.add_argument("--short-below", type=int, default=2048, help="prompt tokens below which the short pool serves")
    parser.add_argument("--short-gpu-share", type=float, default=0.5, help="share of the GPUs in the short pool")
    parser.add_argument("--cheap-price", type=float, default=0.35, help="a cheap card's hour in H100-hours")
    parser.add_argument("--cheap-slowdown", type=float, default=2.5, help="its step times over an H100's")
    parser.add_argument("--cheap-kv-blocks", type=int, default=12_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validate", action="store_true", help="replay bench/fleet.py's trace instead")
    args = parser.parse_args()
    if args.validate:
        from fleetsim.validate import main as validate

        validate()
        return
    try:
        sizes = [int(g) for g in args.gpus.split(",")]
    except ValueError:
        parser.error(f"--gpus: expected comma-separated integers, got {args.gpus!r}")
    if any(g < 1 for g in sizes) or args.cell_gpus < 2 or args.sample_cells < 1 or args.duration <= 0:
        parser.error("--gpus, --cell-gpus (>= 2), --sample-cells and --duration must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for gpus in sizes:
        for scenario in SCENARIOS:
            row = simulate(scenario, gpus, args)
            rows.append(row)
            print(f"{gpus:>6} GPUs  {scenario.name:<34} p99 {row.ttft_p99:.3f} s  "
                  f"{row.gpu_hours_per_m_tokens:.3f} GPU-h/M  hit {row.hit_rate:.1%}  ({row.seconds:.0f} s CPU)",
                  flush=True)
    settings = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in sorted(vars(args).items())
                        if k not in ("out", "validate") and v is not False)
    text = (f"# Fleet simulator: H100 replicas (Llama-3-8B-shaped cost model)\n\n"
            f"Command: `python -P bench/fleetsim/run.py {settings}`\n\n{table(rows)}\n")
    (args.out / "README.md").write_text(text)
    for path in plot(rows, args.out):
        print(f"wrote {path}")
    print(f"wrote {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
