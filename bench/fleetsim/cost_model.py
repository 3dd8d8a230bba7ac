"""Step time of a replica: step_seconds = fixed + a * prefill_tokens + b * decode_seqs + c * context_tokens,
fitted to figures we measured, each with the file it comes from.

`context_tokens` is the KV the step's attention reads: each decoding sequence's length, plus each
prefill chunk's end position. The model is linear on purpose: a decode step of a few sequences
costs one pass over the weights (`fixed`), each more token adds its share of the matmuls (`a`
for a prompt token, `b` for a decoding sequence) and of the attention's KV reads (`c`).

H100 (Llama-3-8B-shaped weights, bf16): `c` comes straight from the decode attention kernel's
bandwidth (one layer's time x 32 layers over the tokens read); `fixed`, `a` and `b` are the
least-squares fit, in relative error, of the whole-engine figures in `H100_MEASUREMENTS`. Each
figure is a sequence of engine steps (derived from the settings of its run by the replica
model's own scheduler, so the fit and the simulator count steps the same way) and its measured
total time. `python -P bench/fleetsim/cost_model.py` prints the fit and its error on every input.

The CPU tier's restore time per block is the kv-offload figure: a 16k-token prefix restored from
CPU (1024 blocks of 16 tokens) took 112.7 ms to the first token against 23.0 ms when on the GPU.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetsim.replica import EngineParams, Replica, Request  # noqa: E402

Features = tuple[int, int, int, int]  # steps, prefill tokens, decode sequences, context tokens (summed)


@dataclass(frozen=True)
class CostModel:
    fixed: float
    a: float  # per prefill token
    b: float  # per decoding sequence
    c: float  # per context token read

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        return self.fixed + self.a * prefill_tokens + self.b * decode_seqs + self.c * context_tokens

    def seconds(self, features: Features) -> float:
        steps, prefill, decode, context = features
        return self.fixed * steps + self.a * prefill + self.b * decode + self.c * context


@dataclass(frozen=True)
class Measurement:
    source: str  # the file of bench/results/ the figure is in
    what: str
    seconds: float
    features: Callable[[], Features]


class _Recorder:
    """A cost model that sums the features of the steps it is asked about (time stands still)."""

    def __init__(self) -> None:
        self.sums = [0, 0, 0, 0]

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        for i, v in enumerate((1, prefill_tokens, decode_seqs, context_tokens)):
            self.sums[i] += v
        return 0.0


def batch_features(prompts: int, prompt_tokens: int, output_tokens: int, params: EngineParams) -> Features:
    """The summed step features of `prompts` requests that all arrive at once, run to the end
    by the replica model (distinct prompts: no prefix hits)."""
    recorder = _Recorder()
    replica = Replica("fit", "fit", replace(params, decode_runs=False), recorder)
    for i in range(prompts):
        replica.enqueue(Request(i, 0.0, prompt_tokens, output_tokens, ()))
    while replica.plan_step() is not None:
        replica.finish_step(0.0)
    return tuple(recorder.sums)  # type: ignore[return-value]


def decode_features(batch: int, context: int) -> Features:
    return (1, 0, batch, batch * context)


def chunked_prefill_features(tokens: int, chunk: int) -> Features:
    ends = range(chunk, tokens + 1, chunk)
    return (len(ends), tokens, 0, sum(ends))


# c: one layer's decode attention at batch 256 over 4096 tokens each, 1420.8 us (kernels-h100.md),
# times the model's 32 layers, over the 256 x 4096 tokens read.
H100_C = 1420.8e-6 * 32 / (256 * 4096)
H100_RESTORE_SECONDS_PER_BLOCK = (112.7e-3 - 23.0e-3) / 1024  # kv-offload-h100.md, fourth run, 16384 tokens

H100_MEASUREMENTS = (
    Measurement("engine-seams-h100.md", "decode step, batch 1, 128-token context (CUDA graphs, async)",
                5.96e-3, lambda: decode_features(1, 128)),
    Measurement("decode-speedups-h100.md", "decode step, batch 16, context 128 (bf16 row)",
                6.42e-3, lambda: decode_features(16, 128)),
    Measurement("kv-offload-h100.md", "TTFT of a 4096-token prompt recomputed (first run), one 4096-token chunk",
                161.6e-3, lambda: chunked_prefill_features(4096, 4096)),
    Measurement("kv-offload-h100.md", "TTFT of a 16384-token prompt recomputed (fourth run), chunks of 4096",
                596.3e-3, lambda: chunked_prefill_features(16384, 4096)),
    Measurement("engine-seams-h100.md", "offline 256 x (512 in, 256 out), 9068 output tokens/s (runs 4-5, after,"
                " async);"
                " max_num_seqs 256, max_num_batched_tokens 8192 (bench/engine.py)",
                256 * 256 / 9068, lambda: batch_features(256, 512, 256, EngineParams(max_num_seqs=256,
                                                                                     max_num_batched_tokens=8192))),
)


def fit(measurements: tuple[Measurement, ...], c: float | None = None) -> CostModel:
    """Least squares in relative error; `c` fixed when given (then only fixed, a, b are fitted)."""
    rows = np.array([m.features() for m in measurements], dtype=float)
    seconds = np.array([m.seconds for m in measurements])
    known = rows[:, 3] * c if c is not None else np.zeros(len(measurements))
    design = rows if c is None else rows[:, :3]
    weights = 1.0 / seconds
    # Non-negative least squares by active set: a negative coefficient has no physical meaning
    # (a token never makes a step shorter), so it is pinned at 0 and the rest refitted.
    free = list(range(design.shape[1]))
    while True:
        solution = np.zeros(design.shape[1])
        lhs, rhs = design[:, free] * weights[:, None], (seconds - known) * weights
        solution[free], *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
        negative = [i for i in free if solution[i] < 0]
        if not negative:
            break
        free.remove(min(negative, key=lambda i: solution[i]))
    fixed, a, b = (float(x) for x in solution[:3])
    return CostModel(fixed, a, b, float(solution[3]) if c is None else c)


def relative_errors(model: CostModel, measurements: tuple[Measurement, ...]) -> list[float]:
    return [model.seconds(m.features()) / m.seconds - 1 for m in measurements]


@functools.cache
def h100() -> CostModel:
    return fit(H100_MEASUREMENTS, c=H100_C)


def report(model: CostModel, measurements: tuple[Measurement, ...], title: str) -> str:
    lines = [f"{title}: step = {model.fixed * 1e3:.3f} ms + {model.a * 1e6:.2f} us x prefill tokens"
             f" + {model.b * 1e6:.2f} us x decoding seqs + {model.c * 1e9:.2f} ns x context tokens",
             "| source | figure | measured s | model s | error |", "|---|---|---|---|---|"]
    for m, err in zip(measurements, relative_errors(model, measurements)):
        lines.append(f"| {m.source} | {m.what} | {m.seconds:.4f} | {model.seconds(m.features()):.4f} | {err:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(h100(), H100_MEASUREMENTS, "H100, Llama-3-8B-shaped, bf16"))
