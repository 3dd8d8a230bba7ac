"""Writes a transformers Llama (or Qwen3-MoE) checkpoint as a llama.cpp-style GGUF file (Q/K rows
permuted as llama.cpp's converter does for Llama, experts stacked into one tensor per projection,
matrices in the chosen quantization), for loader tests."""

import re
from pathlib import Path

import numpy as np
import torch

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
_EXPERTS = {
    "gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight",
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(state: dict[str, torch.Tensor], config, path: Path, qtype: str, arch: str = "llama") -> None:
    """`state` in checkpoint names (one tensor per expert); `arch` llama or qwen3moe."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    kind = gguf.GGMLQuantizationType[qtype]
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        expert = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", name)
        if expert:
            layer, e, projection = expert.groups()
            experts.setdefault(f"blk.{layer}.{_EXPERTS[projection]}", {})[int(e)] = tensor
    stacked = {gname: torch.stack([ws[e] for e in sorted(ws)]) for gname, ws in experts.items()}
    for name, tensor in [*((n, t) for n, t in state.items() if ".experts." not in n), *stacked.items()]:
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        elif name.startswith("blk."):
            gname = name
        else:
            _, _, idx, rest = name.split(".", 3)
            gname = f"blk.{idx}.{_LAYER[rest]}"
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                w = _permute(w, config.num_attention_heads)
            elif arch == "llama" and rest.startswith("self_attn.k_proj"):
                w = _permute(w, config.num_key_value_heads)
        if w.ndim == 1:
            writer.add_tensor(gname, w)
        elif qtype == "F16":
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
