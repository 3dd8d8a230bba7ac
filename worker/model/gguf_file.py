"""Reading a llama.cpp GGUF file: the model's config from its metadata and its tensors,
dequantized and renamed to the Hugging Face names our model uses. llama.cpp stores a MoE
layer's experts stacked, one [experts, out, in] tensor per projection; they are yielded one
expert at a time, as HF checkpoints hold them. Mixtral is llama.cpp's `llama` with experts. The
header is read by kvflock.shared.gguf_header (arrays skipped: 0.2 s where gguf's GGUFReader took
8.8 s for SmolLM2), the tensors are read from one memory map and dequantized in torch
(kvflock.worker.model.gguf_quants)."""

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvflock.shared.gguf_header import GGUFHeader, TensorInfo, read_header
from kvflock.worker.config import ModelConfig
from kvflock.worker.model.gguf_quants import BLOCKS, dequantize, stored_bytes

_ARCH_NAMES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
# GGML's type ids of the types gguf_quants reads.
_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
assert set(_TYPE_NAMES.values()) == set(BLOCKS)

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


@dataclass
class GGUFFile:
    path: Path
    header: GGUFHeader

    @cached_property
    def _bytes(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def field(self, key: str, default: Any = None) -> Any:
        value = self.header.metadata.get(key)
        return default if value is None else value

    def type_name(self, tensor: TensorInfo) -> str:
        if tensor.ggml_type in _TYPE_NAMES:
            return _TYPE_NAMES[tensor.ggml_type]
        import gguf

        try:
            return gguf.GGMLQuantizationType(tensor.ggml_type).name
        except ValueError:
            return f"unknown type {tensor.ggml_type}"

    def tensor(self, tensor: TensorInfo) -> torch.Tensor:
        """The tensor as float32, in the file's row-major order ([rows, columns] for a matrix)."""
        type_name = self.type_name(tensor)
        if type_name not in BLOCKS:
            raise ValueError(f"{self.path}: tensor {tensor.name} has type {type_name}; supported: {sorted(BLOCKS)}")
        shape = tuple(int(d) for d in reversed(tensor.dims))
        try:
            size = stored_bytes(type_name, int(np.prod(shape)))
        except ValueError as exc:
            raise ValueError(f"{self.path}: tensor {tensor.name} is corrupt ({exc})") from None
        start = self.header.data_offset + tensor.offset
        raw = self._bytes[start:start + size]
        if len(raw) != size:
            raise ValueError(f"{self.path}: tensor {tensor.name} runs past the end of the file")
        return dequantize(raw, type_name, shape)


def open_gguf(path: Path) -> GGUFFile:
    """The GGUF file at `path`; a file that is not valid GGUF is a ValueError naming it."""
    return GGUFFile(path, read_header(path))


def has_tokenizer(reader: GGUFFile) -> bool:
    return "tokenizer.ggml.model" in reader.header.metadata


def read_config(reader: GGUFFile, path: Path) -> ModelConfig:
    arch = reader.field("general.architecture")
    if arch not in _ARCH_NAMES:
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported ({sorted(_ARCH_NAMES)})")
    tensors = reader.header.tensors
    names = {t.name for t in tensors}
    num_heads = reader.field(f"{arch}.attention.head_count")
    hidden = reader.field(f"{arch}.embedding_length")
    embed = next(t for t in tensors if t.name == "token_embd.weight")
    experts = reader.field(f"{arch}.expert_count", 0)
    hf: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if arch == "llama" and experts else _ARCH_NAMES[arch]],
        "vocab_size": int(embed.dims[1]),
        "hidden_size": hidden,
        "intermediate_size": reader.field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": reader.field(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": reader.field(f"{arch}.attention.head_count_kv", num_heads),
        "head_dim": reader.field(f"{arch}.attention.key_length", hidden // num_heads),
        "rms_norm_eps": reader.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": reader.field(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": reader.field(f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "eos_token_id": reader.field("tokenizer.ggml.eos_token_id"),
    }
    if experts:  # llama.cpp renormalizes the top k for Mixtral and Qwen3-MoE, not for Qwen2-MoE
        hf |= {
            "num_experts": experts,
            "num_experts_per_tok": reader.field(f"{arch}.expert_used_count"),
            "moe_intermediate_size": reader.field(f"{arch}.expert_feed_forward_length"),
            "shared_expert_intermediate_size": reader.field(f"{arch}.expert_shared_feed_forward_length", 0),
            "norm_topk_prob": arch != "qwen2moe",
        }
        if arch == "llama":  # Mixtral's experts have the model's feed_forward_length
            hf["num_local_experts"] = hf.pop("num_experts")
    scaling_type = reader.field(f"{arch}.rope.scaling.type")
    freq_factors = next((t for t in tensors if t.name == "rope_freqs.weight"), None)
    if freq_factors is not None:  # llama.cpp stores Llama 3.1 scaling as per-frequency divisors
        hf["rope_scaling"] = {"rope_type": "freq_factors",
                              "factors": reader.tensor(freq_factors).reshape(-1).tolist()}
    elif scaling_type == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": reader.field(f"{arch}.rope.scaling.factor")}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {scaling_type!r} is not supported")
    return ModelConfig.from_hf(hf)


def _unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion, which interleaves each head's two rotary halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_count(reader: GGUFFile) -> int:
    """How many tensors `iter_tensors` yields from the file."""
    return sum(1 for t in reader.header.tensors if _hf_name(t.name) is not None)


def iter_tensors(reader: GGUFFile, cfg: ModelConfig, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor in the file."""
    for t in reader.header.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue  # rope_freqs went into the config; nothing else is expected
        data = reader.tensor(t)
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
                yield f"model.layers.{layer}.mlp.experts.{e}.{projection}.weight", expert
            continue
        yield name, data


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
