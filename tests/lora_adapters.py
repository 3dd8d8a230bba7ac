"""Random PEFT LoRA adapters written with safetensors, and transformers models with an
adapter's weights merged in (W + scaling * B @ A): the reference for greedy outputs. Merging
by hand instead of through `peft` keeps peft (and accelerate) out of the lock."""

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: Path, model, rank: int, alpha: float, targets=ALL_TARGETS, seed: int = 0,
                  rslora: bool = False, std: float = 0.3) -> Path:
    """A PEFT adapter for transformers `model` (its projections' shapes), random A and B."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in targets and isinstance(module, torch.nn.Linear):
            prefix = f"base_model.model.{name}"
            a = torch.randn(rank, module.in_features, generator=gen) * std / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=gen) * std / rank**0.5
            tensors[f"{prefix}.lora_A.weight"] = a.float()
            tensors[f"{prefix}.lora_B.weight"] = b.float()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
              "use_rslora": rslora, "bias": "none", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def merged(model, folder: Path):
    """A copy of transformers `model` with the adapter in `folder` merged into its weights."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    tensors = load_file(folder / "adapter_model.safetensors")
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            weight = modules[name].weight
            weight += (scaling * b.double() @ a.double()).to(weight.dtype)
    return out
