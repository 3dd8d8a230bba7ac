"""Reading a llama.cpp GGUF file: the model's config from its metadata and its tensors,
dequantized and renamed to the Hugging Face names our model uses. llama.cpp stores a MoE
layer's experts stacked, one [experts, out, in] tensor per projection; they are yielded one
expert at a time, as HF checkpoints hold them. Mixtral is llama.cpp's `llama` with experts."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvflock.worker.config import ModelConfig

_ARCH_NAMES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
_SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
# Stacked experts: each expert's slice is mlp.experts.<e>.<projection>.weight
_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
# llama.cpp's converter interleaves the rotary halves of Q and K for these only
_PERMUTED_QK = ("llama", "mistral", "mixtral")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: Path) -> Any:
    """A GGUFReader over `path`; a file that is not valid GGUF is a ValueError naming it."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises struct/ValueError/IndexError on bad bytes
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from exc


def has_tokenizer(reader: Any) -> bool:
    return "tokenizer.ggml.model" in reader.fields


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: Any, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_NAMES:
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported ({sorted(_ARCH_NAMES)})")
    names = {t.name for t in reader.tensors}
    num_heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    experts = _field(reader, f"{arch}.expert_count", 0)
    hf: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if arch == "llama" and experts else _ARCH_NAMES[arch]],
        "vocab_size": int(embed.shape[1]),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", num_heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // num_heads),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if experts:  # llama.cpp renormalizes the top k for Mixtral and Qwen3-MoE, not for Qwen2-MoE
        hf |= {
            "num_experts": experts,
            "num_experts_per_tok": _field(reader, f"{arch}.expert_used_count"),
            "moe_intermediate_size": _field(reader, f"{arch}.expert_feed_forward_length"),
            "shared_expert_intermediate_size": _field(reader, f"{arch}.expert_shared_feed_forward_length", 0),
            "norm_topk_prob": arch != "qwen2moe",
        }
        if arch == "llama":  # Mixtral's experts have the model's feed_forward_length
            hf["num_local_experts"] = hf.pop("num_experts")
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    freq_factors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freq_factors is not None:  # llama.cpp stores Llama 3.1 scaling as per-frequency divisors
        hf["rope_scaling"] = {"rope_type": "freq_factors", "factors": [float(x) for x in freq_factors.data]}
    elif scaling_type == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": _field(reader, f"{arch}.rope.scaling.factor")}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {scaling_type!r} is not supported")
    return ModelConfig.from_hf(hf)


def _unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion, which interleaves each head's two rotary halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_tensors(reader: Any, cfg: ModelConfig, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor in the file."""
    import gguf

    for t in reader.tensors:
        if t.tensor_type.name not in _SUPPORTED_TYPES:
            raise ValueError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}; supported: {sorted(_SUPPORTED_TYPES)}"
            )
        name = _hf_name(t.name)
        if name is None:
            continue  # rope_freqs went into the config; nothing else is expected
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ValueError(f"{path}: tensor {t.name} is corrupt ({exc})") from exc
        data = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if not data.flags.writeable:  # unquantized tensors are read-only views of the mmap
            data = data.copy()
        if cfg.architecture in _PERMUTED_QK:
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                data = _unpermute_qk(data, cfg.num_heads)
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                data = _unpermute_qk(data, cfg.num_kv_heads)
        if name.endswith("shared_expert_gate.weight"):  # llama.cpp keeps this [1, hidden] matrix as a vector
            data = data.reshape(1, -1)
        if name.endswith("_exps.weight"):
            layer, projection = name.split(".")[2], _EXPERT_NAMES[t.name.split(".", 2)[2]]
            for e, expert in enumerate(data):
                yield f"model.layers.{layer}.mlp.experts.{e}.{projection}.weight", torch.from_numpy(expert.copy())
            continue
        yield name, torch.from_numpy(np.ascontiguousarray(data))


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
        if rest in _EXPERT_NAMES:  # split into experts by iter_tensors
            return f"model.layers.{idx}.{rest}"
    return None
