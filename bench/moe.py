"""A Qwen3-30B-A3B-shaped mixture-of-experts model (128 experts, top 8, 48 layers) with dummy
bf16 weights on one GPU, against transformers on the same weights (shared, not copied: both
fit one 80 GB GPU only so), in one run.

1. Decode at batch 1: median step time (CUDA graphs, async scheduling), tokens/s, and its
   fraction of the bandwidth limit of the bytes a token actually reads: attention, norms, router
   and LM head weights, the top-k experts of each layer (not all 128), one embedding row and the
   KV cache; beside it transformers' generate with a static cache.
2. Offline throughput: --requests x (--prompt-len in, --output-len out) output tokens/s, beside
   transformers' continuous batching (generate_batch) on the same requests.
3. The MoE layers' share of the model's GPU time per step (eager, CUDA events around each MoE
   block and around the forward pass) at decode batch 1, decode batch 64 and a prefill step.

All requests ignore EOS, so both engines generate the same number of tokens.

    python bench/moe.py --out bench/results/moe-h100.md
    python bench/moe.py --layers 4 --requests 32 --skip-transformers   # quick check
"""

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from kvflock.worker.model.moe import SparseMoE
from engine import decode_steps_ms, random_prompts, run_requests, transformers_batch, transformers_decode
from kernel_bench import copy_bandwidth  # bench/kernel_bench.py

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def bytes_per_token(llm: LLM, context: int) -> int:
    """Bytes one batch-1 decode step reads: every weight but the experts' and the embedding,
    one embedding row, top_k experts per MoE layer, and `context` tokens of KV."""
    cfg = llm.engine.loaded.config
    assert cfg.moe is not None
    total = 0
    for name, p in llm.engine.loaded.model.named_parameters():
        if ".experts." in name:
            continue
        size = p.numel() * p.element_size()
        total += size // p.shape[0] if name == "model.embed_tokens.weight" else size
    expert = 3 * cfg.hidden_size * cfg.moe.intermediate_size * 2
    total += len(cfg.moe.sparse_layers) * cfg.moe.top_k * expert
    return total + cfg.num_layers * 2 * context * cfg.num_kv_heads * cfg.head_dim * 2


@contextmanager
def moe_share(model: torch.nn.Module) -> Iterator[list[float]]:
    """Yields a list that, on exit, holds [MoE blocks' GPU ms, forward passes' GPU ms] of the
    forward passes run inside (eager only: hooks do not run in a replayed CUDA graph)."""
    spans: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {"moe": [], "model": []}

    def hooks(kind: str, module: torch.nn.Module) -> list:
        def before(*_: object) -> None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            spans[kind].append((start, end))

        def after(*_: object) -> None:
            spans[kind][-1][1].record()

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    handles = hooks("model", model.model)
    for m in model.modules():
        if isinstance(m, SparseMoE):
            handles += hooks("moe", m)
    result: list[float] = []
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        torch.cuda.synchronize()
        result += [sum(s.elapsed_time(e) for s, e in spans[k]) for k in ("moe", "model")]


def transformers_model(folder: Path, llm: LLM):  # noqa: ANN201 (transformers' type)
    """transformers' Qwen3-MoE holding the engine's tensors: the dense weights by name, each
    layer's experts as the engine's stacked [experts, 2 * features, hidden] and [experts,
    hidden, features] tensors, which are transformers' own layout (the engine stores each
    expert's matrix input-major; transformers reads them through strides)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    ours = llm.engine.loaded.model
    dense = {k: v for k, v in ours.state_dict().items() if ".experts." not in k}
    missing, _ = model.load_state_dict(dense, strict=False, assign=True)
    for theirs, mine in zip(model.model.layers, ours.model.layers):
        theirs.mlp.experts.gate_up_proj = torch.nn.Parameter(mine.mlp.w13, requires_grad=False)
        theirs.mlp.experts.down_proj = torch.nn.Parameter(mine.mlp.w2, requires_grad=False)
    if any("rotary" not in name and ".experts." not in name for name in missing):
        raise RuntimeError(f"transformers' model has parameters the engine's lacks: {missing[:4]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config, device="cuda")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48, help="fewer layers for a quick check")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the report here (markdown)")
    args = parser.parse_args()

    copy_gbs = copy_bandwidth()  # before the weights take the memory it needs
    torch.cuda.empty_cache()
    shape = {**QWEN3_30B_A3B, "num_hidden_layers": args.layers}
    vocab = shape["vocab_size"]
    folder = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    (folder / "config.json").write_text(json.dumps(shape))
    llm = LLM(str(folder), load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=args.requests,
              max_num_batched_tokens=8192, gpu_memory_utilization=args.gpu_memory_utilization)
    engine = llm.engine
    weight_gb = sum(p.numel() * p.element_size() for p in engine.loaded.model.parameters()) / 1e9
    context = 128 + args.decode_steps // 2
    read = bytes_per_token(llm, context)
    limit = copy_gbs * 1e9 / read
    report = [f"# Qwen3-30B-A3B-shaped MoE on {torch.cuda.get_device_name()}, {date.today()}", "",
              f"{args.layers} layers, 128 experts, top 8, dummy bf16 weights ({weight_gb:.1f} GB), torch "
              f"{torch.__version__}. A batch-1 decode token reads {read / 1e9:.2f} GB (attention, router, LM head, "
              f"8 experts per layer, KV at {context} tokens); at the copy bandwidth measured here, {copy_gbs:.0f} "
              f"GB/s, that bounds decode at {limit:.1f} tokens/s.", ""]

    # 1. decode at batch 1
    prompt = random_prompts(1, [128], vocab, seed=1)
    decode_steps_ms(engine, prompt, 16)  # warm-up
    step_ms = statistics.median(decode_steps_ms(engine, prompt, args.decode_steps))
    report += ["## Decode, batch 1 (128-token prompt)", "",
               "| | ms per step | tokens/s | fraction of the bandwidth limit |", "|---|---|---|---|",
               f"| kvflock, CUDA graphs, async scheduling | {step_ms:.2f} | {1000 / step_ms:.1f} | "
               f"{1000 / step_ms / limit:.2f} |"]
    print("\n".join(report), flush=True)

    # 2. offline throughput
    prompts = random_prompts(args.requests, [args.prompt_len] * args.requests, vocab, seed=2)
    outs = [args.output_len] * args.requests
    run_requests(llm, random_prompts(args.requests, [args.prompt_len] * args.requests, vocab, seed=6), outs)
    tokens, seconds = run_requests(llm, prompts, outs)
    ours = tokens / seconds
    print(f"kvflock offline: {ours:.1f} output tokens/s", flush=True)

    # 3. the MoE layers' share of GPU time
    eager = LLMEngine(EngineConfig(**{**engine.config.model_dump(), "enforce_eager": True, "num_kv_blocks": 2048}),
                      loaded=engine.loaded)
    shares = []
    for label, batch, prompt_len, steps in [("decode, batch 1", 1, 128, 32), ("decode, batch 64", 64, 128, 32)]:
        batch_prompts = random_prompts(batch, [prompt_len] * batch, vocab, seed=batch)
        decode_steps_ms(eager, batch_prompts, 4)  # warm-up
        params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
        for i, p in enumerate(batch_prompts):
            eager.add_request(f"share-{batch}-{i}", p, params)
        eager.step()  # the prefill, outside the window
        with moe_share(engine.loaded.model) as share:
            while eager.has_unfinished_requests():
                eager.step()
        shares.append((label, *share))
    for i, p in enumerate(random_prompts(16, [512] * 16, vocab, seed=9)):
        eager.add_request(f"prefill-{i}", p, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    with moe_share(engine.loaded.model) as share:
        eager.step()  # 16 x 512 prompt tokens, in max_num_batched_tokens' chunk
    shares.append(("prefill, 8192 tokens", *share))
    while eager.has_unfinished_requests():
        eager.step()
    del eager
    gc.collect()

    # 4. transformers on the same weights
    theirs_decode = theirs = None
    if not args.skip_transformers:
        model = transformers_model(folder, llm)
        engine.runner.decode_graphs = None
        del llm, engine
        gc.collect()
        torch.cuda.empty_cache()
        try:  # a failure of the baseline is reported; our figures stay
            theirs_decode = transformers_decode(model, prompt[0], args.decode_steps)
            print(f"transformers static-cache decode: {theirs_decode:.1f} tokens/s", flush=True)
            t_tokens, t_seconds = transformers_batch(model, prompts, outs)
            theirs = t_tokens / t_seconds
            print(f"transformers offline: {theirs:.1f} tokens/s", flush=True)
        except Exception as exc:
            print(f"transformers: failed: {exc!r}", flush=True)
    if theirs_decode is not None:
        report.append(f"| transformers generate, static cache, same weights (prefill included) | | "
                      f"{theirs_decode:.1f} | {theirs_decode / limit:.2f} |")
    report += ["", "## Offline throughput (output tokens/s)", "",
               "| workload | kvflock | transformers generate_batch | ratio |", "|---|---|---|---|",
               f"| {args.requests} x ({args.prompt_len} in, {args.output_len} out) | {ours:.0f} | "
               + (f"{theirs:.0f} | {ours / theirs:.1f}x |" if theirs else "n/a | |")]
    report += ["", "## MoE layers' share of the forward pass's GPU time (eager)", "",
               "| step | MoE ms | forward ms | share |", "|---|---|---|---|"]
    report += [f"| {label} | {moe:.1f} | {fwd:.1f} | {moe / fwd:.0%} |" for label, moe, fwd in shares]
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
