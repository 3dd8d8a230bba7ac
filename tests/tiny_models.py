"""Tiny random Llama, Mistral, Qwen2, Qwen3 and mixture-of-experts (Qwen3-MoE, Qwen2-MoE,
Mixtral) checkpoints (float64 reference weights), built with transformers so that our loader
reads exactly what a real checkpoint holds."""

from pathlib import Path

import torch

VOCAB = 256


def _common(num_layers: int) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )


def tiny_configs(num_layers: int = 2) -> dict:
    from transformers import (
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    return {
        # Llama 3.1 style: llama3 rope scaling, GQA 4:1
        "llama": LlamaConfig(
            **_common(num_layers),
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "mistral": MistralConfig(**_common(num_layers), sliding_window=None),
        # Qwen2: qkv bias, tied embeddings, GQA 2:1
        "qwen2": Qwen2Config(**{**_common(num_layers), "num_key_value_heads": 4}, tie_word_embeddings=True),
        # Qwen3: q/k RMSNorm per head, head_dim (16) not hidden / heads (8)
        "qwen3": Qwen3Config(**_common(num_layers), head_dim=16),
        # Qwen3-MoE: 8 experts, top 2 renormalized, every layer sparse
        "qwen3_moe": Qwen3MoeConfig(
            **_common(num_layers), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        ),
        # Qwen2-MoE: a shared expert with its sigmoid gate, top 2 not renormalized, layer 2 dense
        "qwen2_moe": Qwen2MoeConfig(
            **{**_common(num_layers), "num_hidden_layers": 3}, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[2],
        ),
        # Mixtral: 4 experts of intermediate_size, top 2 always renormalized
        "mixtral": MixtralConfig(**_common(num_layers), num_local_experts=4, num_experts_per_tok=2,
                                 sliding_window=None),
    }


def write_tiny_models(root: Path, num_layers: int = 2, only: tuple[str, ...] | None = None) -> dict[str, Path]:
    """The tiny checkpoints under `root`, of `num_layers` layers (pipeline stages need layers to
    split; Qwen2-MoE keeps its 3); `only`: some of them."""
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (name, config) in enumerate(tiny_configs(num_layers).items()):
        if only is not None and name not in only:
            continue
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
        # Wider weights than the default init, so that the logits of a random model are far
        # apart and greedy decoding is decided by the model, not by rounding.
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" not in pname:
                    p.normal_(0.0, 0.25 if p.dim() > 1 else 0.1)
        model.generation_config.eos_token_id = None
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def hf_greedy(path_or_model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one prompt at a time (no padding),
    up to and including EOS where the model has one."""
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(path_or_model, Path):
        # The experts one by one: transformers' default grouped matmul has no float64.
        model = AutoModelForCausalLM.from_pretrained(
            path_or_model, dtype=torch.float64, experts_implementation="eager"
        ).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False,
                attention_mask=torch.ones_like(ids), pad_token_id=0,
            )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs
