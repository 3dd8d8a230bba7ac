"""Accuracy of fp8, int8 and int4 against float32 on SmolLM2 (the demo model), on CPU.

    python bench/quant_accuracy.py [--num-prompts 8] [--max-tokens 32] [--out bench/results/quantization-cpu.md]

For each format the decoder's projections are quantized in memory (fp8: e4m3 weights per
channel, activations per token; int8 per channel; int4 in groups of 64, since SmolLM2's 576
hidden features are not a multiple of 128), all through the torch reference path. Reports
greedy agreement with float32 (identical outputs; mean fraction of tokens before the first
difference) and the mean |delta logprob| of float32's greedy tokens, teacher-forced: each
format scores the float32 continuation token by token under the same context.
"""

import argparse
import datetime
import platform
import statistics

import torch
from offline import make_conversations  # bench/offline.py
from quant import first_difference, projections  # bench/quant.py

from kvflock.worker.attention import AttentionMetadata
from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM
from kvflock.worker.model.quant import FP8_SPEC, QuantSpec, replace_linears
from kvflock.worker.runner import allocate_kv_cache

FORMATS = {"fp8 e4m3 (W8A8, per channel / per token)": FP8_SPEC, "int8 (per channel)": QuantSpec(8, -1),
           "int4 (groups of 64)": QuantSpec(4, 64)}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm = LLM("demo", device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=args.num_prompts,
              enable_prefix_caching=False)
    model = llm.engine.loaded.model
    prompts = [llm.apply_chat_template(c) for c in make_conversations(args.num_prompts)]
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    ref_lp = [token_logprobs(llm, p, r) for p, r in zip(prompts, reference)]
    plain = {name: (parent, module) for name, parent, module in projections(model)}
    rows = ["| format | identical outputs | mean fraction before first difference | mean abs delta logprob | "
            "max abs delta logprob |", "|---|---|---|---|---|"]
    for name, spec in FORMATS.items():
        replace_linears(model, spec, triton=False, quantize=True)
        model.fuse_projections()
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        deltas = torch.cat([(token_logprobs(llm, p, r) - lp).abs() for p, r, lp in zip(prompts, reference, ref_lp)])
        for key, (parent, module) in plain.items():
            setattr(parent, key.rsplit(".", 1)[1], module)
        model.fuse_projections()
        same = sum(o == r for o, r in zip(outputs, reference))
        before = statistics.mean(first_difference(o, r) / max(len(r), 1) for o, r in zip(outputs, reference))
        rows.append(f"| {name} | {same}/{len(reference)} | {before:.2f} | {deltas.mean():.4f} | {deltas.max():.3f} |")
        print(rows[-1], flush=True)
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    header = [f"# Quantization accuracy on CPU: SmolLM2-135M-Instruct against float32",
              "", f"`python bench/quant_accuracy.py --num-prompts {args.num_prompts} --max-tokens {args.max_tokens}`; "
              f"{device}; torch {torch.__version__}; {datetime.date.today()}", "",
              f"{args.num_prompts} chat prompts of bench/offline.py, up to {args.max_tokens} greedy tokens, float32, "
              "torch reference path. Delta logprob: float32's greedy tokens scored teacher-forced by each format.", ""]
    if args.out:
        from pathlib import Path

        Path(args.out).write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
