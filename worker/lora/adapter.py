"""A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) read into memory and
checked against the base model: which projections it changes, with what rank and scaling.

Every failure is a ValueError naming `lora_path` and saying what is wrong, so the load
endpoint can answer 400 with it.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvflock.worker.config import ModelConfig

# The projections an adapter may change, as (group, index in the group): q/k/v and gate/up
# are fused in the model (kvflock.worker.model.llama), so their deltas land in column slices
# of one output.
PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoRAWeights:
    """One adapter in memory: per (layer, projection) its A [r, in] and its B [out, r] with the
    scaling folded in; `content_hash` identifies its weights and scaling (prefix cache keys)."""

    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    content_hash: int

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of the whole (single-rank) model."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def read_adapter(path: str | Path, cfg: ModelConfig, max_rank: int, dtype: torch.dtype) -> LoRAWeights:
    """The adapter in folder `path`, its weights in `dtype` on the CPU."""
    folder = Path(path)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"lora_path: {str(path)!r} is not a PEFT adapter folder (needs adapter_config.json and "
                         "adapter_model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"lora_path: {config_file} is not valid JSON ({exc})") from None
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_path: adapter_config.json's r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"lora_path: the adapter's rank {rank} exceeds max_lora_rank={max_rank}; start the "
                         "engine with a larger max_lora_rank")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if config.get(unsupported):
            raise ValueError(f"lora_path: adapter_config.json's {unsupported} is not supported (one rank and alpha "
                             "for every module)")
    if config.get("use_dora"):
        raise ValueError("lora_path: DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValueError("lora_path: adapters that train biases or whole modules (bias, modules_to_save) are not "
                         "supported")
    scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank

    raw = weights_file.read_bytes()
    tensors = load_file(weights_file)
    shapes = projection_shapes(cfg)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None or match.group(2) not in PROJECTIONS:
            raise ValueError(f"lora_path: tensor {key!r} is not a LoRA weight of "
                             f"{'/'.join(PROJECTIONS)} (embeddings and the LM head are not supported)")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if layer >= cfg.num_layers:
            raise ValueError(f"lora_path: tensor {key!r} is for layer {layer}; the model has {cfg.num_layers}")
        pairs.setdefault((layer, module), {})[which] = tensor
    weights = {}
    for (layer, module), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"lora_path: layer {layer} {module} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[module]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise ValueError(f"lora_path: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                             f"this model needs A ({rank}, {fan_in}) and B ({fan_out}, {rank})")
        weights[(layer, module)] = (a.to(dtype), (b.double() * scaling).to(dtype))
    if not weights:
        raise ValueError(f"lora_path: {weights_file} holds no LoRA weights")
    digest = hashlib.blake2b(raw, digest_size=8)
    digest.update(repr(scaling).encode())
    return LoRAWeights(rank, weights, int.from_bytes(digest.digest(), "little"))
