"""Accuracy of fp8, int8 and int4 (round-to-nearest, GPTQ, AWQ-style scales) against float32 on
SmolLM2 (the demo model), on CPU.

    python bench/quant_accuracy.py [--num-prompts 8] [--max-tokens 32] [--out bench/results/quantization-cpu.md]

For each format the decoder's projections are quantized in memory (fp8: e4m3 weights per
channel, activations per token; int8 per channel; int4 in groups of 64, since SmolLM2's 576
hidden features are not a multiple of 128), through the torch reference path (or the same product on dequantized float weights):

- RTN: round-to-nearest per group, asymmetric (what `quantization: int4` does at load) and
  symmetric (what `kvflock quantize` writes for vLLM).
- GPTQ: symmetric, layer by layer (kvflock.worker.model.gptq, as `kvflock quantize --method
  gptq` runs it).
- AWQ-style: per input feature scales s = mean|x|^a (a searched in 0, 0.1, .., 1 per layer to
  minimize the output error on the calibration inputs) multiply the weights before rounding and
  divide them after, for the projections that read a norm's output (q/k/v, gate/up), where a
  checkpoint folds 1/s into the norm's weight; o and down are rounded plainly.

Calibration for GPTQ and AWQ: 8 other prompts, each with the float32 model's own 48-token
greedy answer (no prompt of the evaluation set). Reports greedy agreement with float32
(identical outputs; mean fraction of tokens before the first difference) and the mean |delta
logprob| of float32's greedy tokens, teacher-forced: each format scores the float32
continuation token by token under the same context. transformers has no quantized path that
runs on CPU in this environment (its GPTQ/AWQ/bitsandbytes paths need CUDA packages), so no
such column.
"""

import argparse
import contextlib
import datetime
import platform
import statistics
from collections.abc import Iterator

import torch
from offline import make_conversations  # bench/offline.py
from quant import first_difference, projections  # bench/quant.py

from kvflock.worker.attention import AttentionMetadata
from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM
from kvflock.worker.model.gptq import calibrate
from kvflock.worker.model.quant import FP8_SPEC, QuantSpec, quantize_rtn, replace_linears
from kvflock.worker.runner import allocate_kv_cache

INT4 = QuantSpec(4, 64)
INT4_SYM = QuantSpec(4, 64, sym=True)
# name -> (method, spec). "layers": the projections become quantized layers (the engine's torch
# reference path); the others rewrite the float weights with their dequantized values, which is
# the same product (the reference dequantizes to float32 and multiplies) at float speed.
FORMATS = {
    "fp8 e4m3 (W8A8, per channel / per token)": ("layers", FP8_SPEC),
    "int8 RTN (per channel)": ("layers", QuantSpec(8, -1)),
    "int4 RTN (groups of 64)": ("layers", INT4),
    "int4 RTN symmetric (groups of 64)": ("rtn", INT4_SYM),
    "int4 GPTQ symmetric (groups of 64)": ("gptq", INT4_SYM),
    "int4 AWQ-style scales + RTN (groups of 64)": ("awq", INT4),
}
CALIBRATION_TOPICS = ["volcanoes", "bread", "chess", "rivers", "bicycles", "honeybees", "glaciers", "jazz"]
SEARCH_TOKENS = 256  # calibration rows the AWQ-style search measures each candidate on (a speed choice)
NORM_INPUTS = {"self_attn.q_proj": ("self_attn.k_proj", "self_attn.v_proj"), "mlp.gate_proj": ("mlp.up_proj",)}


@torch.inference_mode()
def token_logprobs(llm: LLM, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """log p(continuation[i] | prompt + continuation[:i]) for each i, from one prefill."""
    model = llm.engine.loaded.model
    ids = torch.tensor(prompt + continuation)
    n, block = len(ids), 16
    blocks = -(-n // block)
    kv = allocate_kv_cache(model.config, blocks + 1, block, torch.float32, torch.device("cpu"))
    table = torch.arange(1, blocks + 1, dtype=torch.int32).view(1, -1)  # block 0 stays the null block
    slots = table[0].long().repeat_interleave(block)[:n] * block + torch.arange(n) % block
    meta = AttentionMetadata(slots, table, torch.tensor([n], dtype=torch.int32),
                             torch.tensor([0, n], dtype=torch.int32), False)
    hidden = model(ids, torch.arange(n), kv, meta)
    logits = model.logits(hidden[len(prompt) - 1 : n - 1])
    return torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(continuation).view(-1, 1)).squeeze(1)


def calibration_tokens(llm: LLM) -> list[list[int]]:
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"Explain how {t} work, in a few sentences."}])
               for t in CALIBRATION_TOPICS]
    answers = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48))
    return [p + a.outputs[0].token_ids for p, a in zip(prompts, answers)]


@torch.inference_mode()
def layer_inputs(llm: LLM, calibration: list[list[int]]) -> dict[str, torch.Tensor]:
    """The inputs [tokens, k] of every norm-fed projection group, from the unquantized model."""
    model = llm.engine.loaded.model
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(key: str):
        return lambda _module, inputs: seen.setdefault(key, []).append(inputs[0].reshape(-1, inputs[0].shape[-1]))

    handles = [module.register_forward_pre_hook(keep(name)) for name, _, module in projections(model)
               if name.split(".", 1)[1] in NORM_INPUTS]
    for ids in calibration:
        token_logprobs(llm, ids[:-1], ids[-1:])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def fake_quant(weight: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The weight [n, k] as round-to-nearest leaves it, after multiplying input feature j by
    scales[j] (divided back out)."""
    if scales is None:
        return quantize_rtn(weight, spec).dequantize().t()
    return quantize_rtn(weight * scales, spec).dequantize().t() / scales


@torch.no_grad()
def awq_style(llm: LLM, calibration: list[list[int]], spec: QuantSpec) -> None:
    """Round each projection in place, norm-fed groups with their searched input scales."""
    model = llm.engine.loaded.model
    inputs = layer_inputs(llm, calibration)
    inputs = {name: x[:: max(1, len(x) // SEARCH_TOKENS)] for name, x in inputs.items()}  # evenly spread rows
    modules = {name: module for name, _, module in projections(model)}
    for name, x in inputs.items():
        layer, head = name.split(".", 1)
        group = [modules[f"{layer}.{p}"] for p in (head, *NORM_INPUTS[head])]
        mean_abs = x.abs().mean(0).clamp(min=1e-6)
        best = None
        for alpha in [i / 10 for i in range(11)]:
            s = mean_abs**alpha
            s = s / (s.max() * s.min()).sqrt()
            error = sum((x @ (fake_quant(m.weight, spec, s) - m.weight).t()).pow(2).sum().item() for m in group)
            if best is None or error < best[0]:
                best = (error, s)
        with torch.no_grad():
            for m in group:
                m.weight.copy_(fake_quant(m.weight, spec, best[1]))
    with torch.no_grad():
        for name, module in modules.items():
            if name.split(".", 1)[1] in ("self_attn.o_proj", "mlp.down_proj"):
                module.weight.copy_(fake_quant(module.weight, spec))


@contextlib.contextmanager
def quantized(llm: LLM, method: str, spec: QuantSpec, calibration: list[list[int]]) -> Iterator[None]:
    model = llm.engine.loaded.model
    plain = {name: (parent, module) for name, parent, module in projections(model)}
    if method == "layers":
        replace_linears(model, spec, triton=False, quantize=True)
        model.fuse_projections()
    else:
        saved = {name: module.weight.detach().clone() for name, (_, module) in plain.items()}
        if method == "gptq":
            calibrate(model, calibration, spec)
        elif method == "awq":
            awq_style(llm, calibration, spec)
        else:
            with torch.no_grad():
                for _, module in plain.values():
                    module.weight.copy_(fake_quant(module.weight, spec))
    try:
        yield
    finally:
        if method == "layers":
            for key, (parent, module) in plain.items():
                setattr(parent, key.rsplit(".", 1)[1], module)
            model.fuse_projections()
        else:
            with torch.no_grad():
                for name, (_, module) in plain.items():
                    module.weight.copy_(saved[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--formats", default="", help="only the formats whose name holds one of these "
                        "comma-separated words (default: all)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    words = [w for w in args.formats.split(",") if w]
    formats = {name: f for name, f in FORMATS.items() if not words or any(w in name for w in words)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm = LLM("demo", device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=max(args.num_prompts, 16),
              enable_prefix_caching=False)
    prompts = [llm.apply_chat_template(c) for c in make_conversations(args.num_prompts)]
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    ref_lp = [token_logprobs(llm, p, r) for p, r in zip(prompts, reference)]
    calibration = calibration_tokens(llm)
    rows = ["| format | identical outputs | mean fraction before first difference | mean abs delta logprob | "
            "max abs delta logprob |", "|---|---|---|---|---|"]
    for name, (method, spec) in formats.items():
        with quantized(llm, method, spec, calibration):
            outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            deltas = torch.cat([(token_logprobs(llm, p, r) - lp).abs() for p, r, lp in zip(prompts, reference, ref_lp)])
        same = sum(o == r for o, r in zip(outputs, reference))
        before = statistics.mean(first_difference(o, r) / max(len(r), 1) for o, r in zip(outputs, reference))
        rows.append(f"| {name} | {same}/{len(reference)} | {before:.2f} | {deltas.mean():.4f} | {deltas.max():.3f} |")
        print(rows[-1], flush=True)
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    header = ["# Quantization accuracy on CPU: SmolLM2-135M-Instruct against float32",
              "", f"`python bench/quant_accuracy.py --num-prompts {args.num_prompts} --max-tokens {args.max_tokens}"
              f"{f' --formats {args.formats}' if args.formats else ''}`; "
              f"{device}; torch {torch.__version__}; {datetime.date.today()}", "",
              f"{args.num_prompts} chat prompts of bench/offline.py, up to {args.max_tokens} greedy tokens, float32, "
              "torch reference path (or its product, see FORMATS). Delta logprob: float32's greedy tokens scored teacher-forced by each format. "
              f"GPTQ and AWQ-style calibrate on {len(calibration)} other prompts with float32's own answers "
              f"({sum(map(len, calibration))} tokens). No transformers column: none of its quantized paths runs on "
              "CPU here.", ""]
    if args.out:
        from pathlib import Path

        Path(args.out).write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
