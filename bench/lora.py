"""Multi-LoRA serving cost: output tokens/s of a batch of 64 requests (decode-dominated) with 1, 8
and 64 distinct rank-16 adapters against the base model alone, all in the same run on dummy
weights of an 8B Llama shape (bfloat16, CUDA graphs, async scheduling). Each adapter touches all
seven projections; max_loras equals the adapters in the batch, so no step swaps.

    python bench/lora.py                      # on a GPU, 8B shape
    python bench/lora.py --shape tiny --device cpu --requests 4 --output-len 4   # quick check
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.lora.adapter import PROJECTIONS, projection_shapes
from tp import SHAPES  # bench/tp.py


def write_adapters(root: Path, engine: LLMEngine, count: int, rank: int) -> list[Path]:
    shapes = projection_shapes(engine.model_config)
    folders = []
    for i in range(count):
        folder = root / f"adapter-{i}"
        folder.mkdir(parents=True)
        tensors = {}
        for layer in range(engine.model_config.num_layers):
            for module in PROJECTIONS:
                fan_in, fan_out = shapes[module]
                where = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{where}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, dtype=torch.bfloat16) * 0.01
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, dtype=torch.bfloat16) * 0.01
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
        folders.append(folder)
    return folders


def tokens_per_second(engine: LLMEngine, adapters: list[str | None], args: argparse.Namespace) -> float:
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    for i in range(args.requests):
        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        engine.add_request(f"bench-{time.perf_counter_ns()}-{i}", prompt, params, adapters[i % len(adapters)])
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return args.requests * args.output_len / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", default="1,8,64", type=lambda s: [int(x) for x in s.split(",")])
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    (folder / "config.json").write_text(json.dumps({**SHAPES[args.shape], "model_type": "llama",
                                                    "max_position_embeddings": 4096}))
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    common = dict(model=str(folder), load_format="dummy", dtype=dtype, device=args.device, max_model_len=2048,
                  max_num_seqs=args.requests)
    base = LLMEngine(EngineConfig(**common))
    base.warm_up()
    baseline = tokens_per_second(base, [None], args)
    loaded = base.loaded
    del base
    print(f"{args.shape} dummy weights ({dtype}) on {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}"
          f", batch {args.requests}, rank {args.rank}")
    print(f"base model alone: {baseline:.0f} output tokens/s")
    for count in args.adapters:
        engine = LLMEngine(EngineConfig(**common, enable_lora=True, max_loras=count, max_lora_rank=args.rank,
                                        max_cpu_loras=max(count, 32)), loaded=loaded)
        paths = write_adapters(folder / f"set-{count}", engine, count, args.rank)
        for i, path in enumerate(paths):
            engine.load_lora(f"a{i}", str(path))
        engine.warm_up()
        rate = tokens_per_second(engine, [f"a{i}" for i in range(count)], args)
        print(f"{count:3d} adapter(s): {rate:.0f} output tokens/s, {rate / baseline:.2f}x the base model")
        del engine


if __name__ == "__main__":
    main()
