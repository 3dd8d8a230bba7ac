"""FP8 KV cache: how many 4k-token requests fit in the same KV memory as bf16, and how often
greedy answers on SmolLM2 stay the same (32 chat prompts, same model weights, bf16 compute).

    python bench/kv_fp8.py                       # CPU, SmolLM2 demo, bf16 vs fp8 KV
"""

import argparse
import platform
from datetime import date

import torch

from kvflock.worker.attention import select_attention_backend
from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from kvflock.worker.model.loader import load
from kvflock.worker.runner import kv_bytes_per_block
from offline import make_conversations  # bench/offline.py: the same prompts as the throughput benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--kv-gib", type=float, default=40.0, help="KV memory for the capacity figure")
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    loaded = load(config, select_attention_backend(config.torch_device()))
    cfg, block = loaded.config, 16
    per_request = -(-args.context // block)
    fits = {name: int(args.kv_gib * 2**30 // kv_bytes_per_block(cfg, block, dtype)) // per_request
            for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn))}

    conversations = make_conversations(args.num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = {}
    for kv in ("auto", "fp8"):
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=1024,
                                        kv_cache_dtype=kv, max_num_seqs=args.num_prompts), loaded=loaded)
        outputs[kv] = [o.outputs[0].token_ids for o in LLM.from_engine(engine).chat(conversations, params)]
    same = sum(a == b for a, b in zip(outputs["auto"], outputs["fp8"]))
    agreeing = []
    for a, b in zip(outputs["auto"], outputs["fp8"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreeing.append(n / max(len(a), 1))

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()})"
    print(f"fp8 KV cache, {args.model}, {args.dtype} compute, {device}, {date.today()}")
    print(f"requests of {args.context} tokens in {args.kv_gib} GiB of KV: bf16 {fits['bf16']}, fp8 {fits['fp8']} "
          f"({fits['fp8'] / fits['bf16']:.2f}x)")
    print(f"greedy answers identical to the bf16 cache: {same}/{args.num_prompts}; "
          f"mean share of tokens before the first difference: {sum(agreeing) / len(agreeing):.2f}")


if __name__ == "__main__":
    main()
