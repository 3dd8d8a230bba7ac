"""Output tokens/s with structured outputs against free generation, on the same prompts, in one run.

Each round runs --batch chat prompts at once, greedy, three times: free (EOS ignored, so every
sequence generates --max-tokens tokens), constrained by the twenty JSON schemas of
bench/json_schemas.py (one per prompt, in turn; a sequence ends where its JSON does), and
constrained by a JSON array of digits that must be longer than --max-tokens tokens (so that,
like the free one, every sequence generates --max-tokens tokens: the same steps at the same batch
sizes). Prints output tokens/s of each and its ratio to free.

    python bench/structured_output.py                                   # CPU, the SmolLM2 demo model
    python bench/structured_output.py --shape llama-3-8b --device cuda --dtype bfloat16 --batch 64

With --shape the model has dummy weights of that shape and the demo model's tokenizer (the model's
vocabulary may be larger than the tokenizer's: its extra ids are masked out).
"""

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from json_schemas import SCHEMAS  # bench/json_schemas.py
from kvflock.worker.config import SamplingParams, StructuredOutput
from kvflock.worker.llm import LLM
from kvflock.worker.model.source import resolve_model
from kvflock.worker.model.tokenizer import load_tokenizer
from tp import SHAPES  # bench/tp.py

QUESTIONS = ["Describe a person as JSON.", "Give me a recipe as JSON.", "List three cities as JSON.",
             "Summarize the news as JSON.", "Describe a cat as JSON.", "Plan a trip as JSON."]


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[int, float]:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="dummy weights of this shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        engine_args = dict(device=args.device, dtype=args.dtype, max_model_len=1024,
                           max_num_seqs=max(args.batch, 1))
        if args.shape is None:
            model, label = "demo", "SmolLM2-135M (demo)"
        else:
            (Path(folder) / "config.json").write_text(json.dumps(SHAPES[args.shape]))
            load_tokenizer(resolve_model("demo")).save_pretrained(folder)
            model, label = folder, f"{args.shape} (dummy weights)"
            engine_args["load_format"] = "dummy"
        llm = LLM(model, **engine_args)
        prompts = [llm.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                   for i in range(args.batch)]
        free = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)] * args.batch
        schemas = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                  structured_output=StructuredOutput(json_schema=SCHEMAS[i % len(SCHEMAS)][0]))
                   for i in range(args.batch)]
        digits = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                  "minItems": args.max_tokens}
        unbounded = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                    structured_output=StructuredOutput(json_schema=digits))] * args.batch
        run(llm, prompts[:2], [p.model_copy(update={"max_tokens": 4}) for p in schemas[:2]])  # warm-up, compiles
        totals = {"free": [0, 0.0], "20 JSON schemas": [0, 0.0], "long JSON array": [0, 0.0]}
        for _ in range(args.rounds):  # interleaved, so that a slower stretch of the machine hits all three
            for name, params in zip(totals, (free, schemas, unbounded)):
                tokens, seconds = run(llm, prompts, params)
                totals[name][0] += tokens
                totals[name][1] += seconds

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    base = totals["free"][0] / totals["free"][1]
    print(f"{label} on {device}, {args.dtype}, batch {args.batch}, max_tokens {args.max_tokens}, "
          f"{args.rounds} rounds, {date.today()}")
    print("| workload | output tokens | output tokens/s | ratio to free |\n|---|---|---|---|")
    for name, (tokens, seconds) in totals.items():
        print(f"| {name} | {tokens} | {tokens / seconds:.1f} | {tokens / seconds / base:.3f} |")


if __name__ == "__main__":
    main()
