"""Speculative decoding with prompt lookup (n-gram drafts): output tokens/s, acceptance rate and
tokens per step, with and without it, on a workload whose answers repeat their input (rewrite a
given text) and on one whose answers do not (open questions), in one run.

1. Llama-3-8B-shaped dummy weights: tokens/s without speculation (the baseline, CUDA graphs as
   configured) and with prompt lookup, on both workloads. Random weights write arbitrary tokens,
   so their acceptance rate says nothing about a real model; what this row measures is what
   drafting and verification cost when drafts fail.
2. SmolLM2-135M-Instruct (real weights, the demo model) on the same prompts: acceptance rate,
   tokens per step and tokens/s, with and without prompt lookup. This is the acceptance a real
   model reaches on these workloads.
3. Llama-3-8B-shaped: the time of a step that verifies k drafts for every sequence (drafts forced),
   against a plain decode step, and the tokens/s that the 8B model would reach at SmolLM2's
   tokens per step (a projection from measured step times, labelled as such).

Every request is greedy and ignores EOS, so runs with and without speculation generate the same
tokens.

    python bench/spec_decode.py --out bench/results/spec-decode-h100.md
    python bench/spec_decode.py --smoke      # CPU, tiny shapes: checks that it runs
"""

import argparse
import gc
import json
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import torch
from offline import make_conversations  # bench/offline.py: the open questions

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from kvflock.worker.sequence import Sequence
from kvflock.worker.spec_decode.drafters import Draft

LLAMA_3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_theta=10000.0, rms_norm_eps=1e-5)

SOURCE_TEXT = [
    "The harbour town woke slowly. Fishing boats came back before dawn, and the market opened as soon as the "
    "first crates of mackerel reached the quay. Traders argued about prices while gulls circled overhead.",
    "By mid-morning the ferry to the islands had left, carrying tourists, a postman and two crates of apples. "
    "The captain checked the weather twice, because the wind had turned to the north overnight.",
    "In the afternoon the school children walked to the lighthouse, where the keeper showed them the lamp, "
    "the logbook and the old brass telescope that his grandfather had used to watch for storms.",
    "When evening came, the cafes along the promenade filled up, and the smell of grilled fish drifted over "
    "the water while the last boats were tied up for the night.",
]
REPEAT_ASKS = [
    "Rewrite the text above word for word, but replace 'boats' with 'ships'.",
    "Copy the text above exactly, fixing nothing and adding nothing.",
    "Repeat the text above, keeping every sentence, and put the word 'Note:' in front of it.",
]


def repeating_conversations(n: int) -> list[list[dict]]:
    """Ask to repeat or edit a given text: the answer copies long spans of the prompt."""
    conversations = []
    for i in range(n):
        text = " ".join(SOURCE_TEXT[(i + j) % len(SOURCE_TEXT)] for j in range(len(SOURCE_TEXT)))
        conversations.append([{"role": "user", "content": f"{text}\n\n{REPEAT_ASKS[i % len(REPEAT_ASKS)]}"}])
    return conversations


@dataclass
class Run:
    tokens: int
    seconds: float
    steps: int
    acceptance: float | None
    tokens_per_step: float | None

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> Run:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm = LLM.from_engine(engine)
    # Warm-up on the same prompts: the first run of a batch shape pays one-time costs (cuBLAS
    # heuristics, Triton compiles), and the timed run then finds the prompts in the prefix cache,
    # so it times decoding alone, with and without drafts alike.
    llm.generate(prompts, params.model_copy(update={"max_tokens": 4}))
    spec = engine.speculator
    before = replace(spec.stats) if spec else None  # the warm-up's counts, taken off below
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    steps, tokens = 0, 0
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        steps += 1
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if spec is None or before is None:
        return Run(tokens, elapsed, steps, None, None)
    drafted = spec.stats.num_drafted_tokens - before.num_drafted_tokens
    accepted = spec.stats.num_accepted_tokens - before.num_accepted_tokens
    verifications = spec.stats.num_verifications - before.num_verifications
    return Run(tokens, elapsed, steps, accepted / drafted if drafted else 0.0,
               (accepted + verifications) / verifications if verifications else 1.0)


class ForcedDrafter:
    """Drafts k copies of the last token for every sequence: each step then verifies k drafts
    per sequence, whatever the weights write (measures the verification step's cost)."""

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Draft]:
        return [Draft([seq.token_ids[-1]] * k) for seq, k in zip(seqs, max_tokens)]

    def release(self, seq: Sequence) -> None:
        pass


def step_seconds(engine: LLMEngine, prompts: list[list[int]], decode_tokens: int) -> float:
    """Median time of the steps after every prompt's prefill, `decode_tokens` per request."""
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"steps-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        running, waiting = engine.scheduler.running, engine.scheduler.waiting
        decoding = not waiting and all(s.num_computed_tokens + 1 == s.num_tokens for s in running)
        start = time.perf_counter()
        engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        if decoding:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def table(title: str, rows: list[tuple[str, Run, Run]]) -> list[str]:
    lines = [title, "| workload | method | output tokens/s | acceptance rate | tokens per step | engine steps "
                    "| ratio to no speculation |", "|---|---|---|---|---|---|---|"]
    for workload, base, spec in rows:
        lines.append(f"| {workload} | none | {base.rate:.1f} | - | 1.00 | {base.steps} | 1.00x |")
        lines.append(f"| {workload} | prompt lookup | {spec.rate:.1f} | {spec.acceptance:.2f} | "
                     f"{spec.tokens_per_step:.2f} | {spec.steps} | {spec.rate / base.rate:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=4, help="requests decoded together")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, few tokens: checks that it runs")
    parser.add_argument("--out", default=None, help="also write the results as markdown to this file")
    parser.add_argument("--smollm2-only", action="store_true",
                        help="only part 2, and write the workloads' token ids to --prompts-file")
    parser.add_argument("--prompts-file", type=Path, default=None,
                        help="without --smollm2-only: read the workloads' token ids from here and skip part 2 "
                             "(for machines without the SmolLM2 package)")
    args = parser.parse_args()
    shape = LLAMA_3_8B
    if args.smoke:
        args.device, args.dtype, args.requests, args.max_tokens, shape = "cpu", "float32", 2, 24, TINY

    spec_settings = dict(speculative_method="ngram", num_speculative_tokens=args.num_speculative_tokens)
    # Several engines live at once: each gets a fixed KV cache, not a share of free GPU memory.
    limits = dict(max_model_len=2048, max_num_seqs=max(args.requests, 8), device=args.device, kv_cache_memory_gib=3.0)
    smol_rows: list[tuple[str, Run, Run]] = []
    if args.prompts_file is not None and not args.smollm2_only:
        workloads = json.loads(args.prompts_file.read_text())
    else:
        smol = LLMEngine(EngineConfig(model="demo", dtype="float32" if args.device == "cpu" else args.dtype, **limits))
        smol_llm = LLM.from_engine(smol)
        workloads = {
            "repeats its input": [smol_llm.apply_chat_template(c) for c in repeating_conversations(args.requests)],
            "open questions": [smol_llm.apply_chat_template(c) for c in make_conversations(args.requests)],
        }

        # 2. SmolLM2: real acceptance. The same loaded weights serve the engine with prompt lookup.
        smol_spec = LLMEngine(EngineConfig(model="demo", dtype=smol.config.dtype, **limits, **spec_settings),
                              loaded=smol.loaded)
        smol_rows = [(name, generate(smol, p, args.max_tokens), generate(smol_spec, p, args.max_tokens))
                     for name, p in workloads.items()]
        del smol, smol_spec, smol_llm
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if args.smollm2_only:
            if args.prompts_file is not None:
                args.prompts_file.write_text(json.dumps(workloads))
            text = "\n".join(table(f"## SmolLM2-135M-Instruct on {args.device}, {args.dtype}, {date.today()}",
                                    smol_rows))
            print(text)
            if args.out:
                Path(args.out).write_text(text + "\n")
            return

    # 1. and 3. Llama-3-8B-shaped dummy weights.
    model_dir = Path(tempfile.mkdtemp(prefix="spec-decode-")) / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **shape}))
    dummy = dict(model=str(model_dir), load_format="dummy", dtype=args.dtype, **limits)
    big = LLMEngine(EngineConfig(**dummy))
    big_spec = LLMEngine(EngineConfig(**dummy, **spec_settings), loaded=big.loaded)
    big_rows = [(name, generate(big, p, args.max_tokens), generate(big_spec, p, args.max_tokens))
                for name, p in workloads.items()]
    forced = LLMEngine(EngineConfig(**dummy, **spec_settings), loaded=big.loaded)
    assert forced.speculator is not None
    forced.speculator.drafter = ForcedDrafter()
    short = workloads["open questions"]
    decode_s = step_seconds(big, short, 32)
    verify_s = step_seconds(forced, short, 32 * (args.num_speculative_tokens + 1))

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    k = args.num_speculative_tokens
    lines = [
        f"# Speculative decoding (prompt lookup, k={k}), {device}, {date.today()}",
        "",
        f"{args.requests} requests decoded together, {args.max_tokens} greedy tokens each (EOS ignored), "
        f"{args.dtype}; prompt lookup matches suffixes of 2 to 4 tokens. Workloads: 'repeats its input' asks to "
        "copy or lightly edit a given text of about 300 tokens; 'open questions' are bench/offline.py's prompts.",
        "",
        *table("## SmolLM2-135M-Instruct (real weights: the acceptance a real model reaches)", smol_rows),
        "",
        *table(f"## {'Llama-3-8B' if shape is LLAMA_3_8B else 'tiny'}-shaped dummy weights (random tokens: "
               "acceptance here is not a real model's; this measures the cost when drafts fail)", big_rows),
        "",
        f"## {'Llama-3-8B' if shape is LLAMA_3_8B else 'tiny'}-shaped step times at batch {args.requests}",
        "| step | median ms |",
        "|---|---|",
        f"| decode, 1 token per sequence | {decode_s * 1000:.2f} |",
        f"| verify, 1 + {k} tokens per sequence (drafts forced) | {verify_s * 1000:.2f} |",
        "",
        "Projection (not a measurement): the 8B-shaped model's ratio to no speculation if it needed as few "
        "engine steps as SmolLM2 did (SmolLM2's steps without / with prompt lookup) and every step cost a "
        "verify step = (steps without / steps with) x decode ms / verify ms (pessimistic: in fact a step "
        "without drafts costs only a decode step).",
        "| workload | SmolLM2 steps without / with | projected ratio to no speculation |",
        "|---|---|---|",
        *[f"| {name} | {base.steps / spec.steps:.2f} | {base.steps / spec.steps * decode_s / verify_s:.2f}x |"
          for name, base, spec in smol_rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
