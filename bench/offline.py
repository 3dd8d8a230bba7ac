"""Offline throughput: our engine against transformers' generate on the same prompts.

Both generate exactly --max-tokens greedy tokens for each of --num-prompts chat prompts
(EOS ignored, so the work is identical); transformers runs them as one left-padded batch.
Prints output tokens/s side by side and the ratio.

    python bench/offline.py                       # CPU, SmolLM2 demo, 32 prompts
    python bench/offline.py --device cuda --dtype bfloat16 --num-prompts 256
"""

import argparse
import platform
import time
from datetime import date

import torch

from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM

TOPICS = ["the sea", "a robot", "winter", "coffee", "a lighthouse", "the moon", "trains", "a library"]
ASKS = ["Write a short poem about {}.", "Tell me three facts about {}.", "Describe {} to a child.",
        "What would a scientist say about {}? Answer in detail, with examples."]


def make_conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": ASKS[i % len(ASKS)].format(TOPICS[i % len(TOPICS)])}] for i in range(n)]


def run_ours(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], params.model_copy(update={"max_tokens": 4}))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs), elapsed


def run_transformers(llm: LLM, prompts: list[list[int]], max_tokens: int, device: str, dtype: torch.dtype) -> tuple[int, float]:
    from transformers import AutoModelForCausalLM

    source = llm.engine.loaded.source
    if source.format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    model = model.to(device).eval()
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(do_sample=False, pad_token_id=pad, min_new_tokens=max_tokens, max_new_tokens=max_tokens)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return (out.shape[1] - width) * len(prompts), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=1024, max_num_seqs=args.num_prompts)
    prompts = [llm.apply_chat_template(c) for c in make_conversations(args.num_prompts)]
    ours_tokens, ours_s = run_ours(llm, prompts, args.max_tokens)
    hf_tokens, hf_s = run_transformers(llm, prompts, args.max_tokens, args.device, llm.engine.dtype)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    ours_rate, hf_rate = ours_tokens / ours_s, hf_tokens / hf_s
    print(f"offline throughput, {args.model}, {args.num_prompts} prompts x {args.max_tokens} tokens, {args.dtype}, {device}, {date.today()}")
    print(f"{'engine':<14}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}")
    print(f"{'kvflock':<14}{ours_tokens:>8}{ours_s:>10.2f}{ours_rate:>11.1f}")
    print(f"{'transformers':<14}{hf_tokens:>8}{hf_s:>10.2f}{hf_rate:>11.1f}")
    print(f"ratio kvflock / transformers: {ours_rate / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
