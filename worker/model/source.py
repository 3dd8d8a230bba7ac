"""Finding a model on disk and reading what it is: the demo model, Hugging Face folders and GGUF
files (`resolve_model`), their architecture (`read_model_config`) and how their weights are
quantized (`resolve_quantization`). Nothing here reads weights."""

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from kvflock.shared.model_files import DEMO_MODEL, demo_model_path
from kvflock.worker.config import ModelConfig
from kvflock.worker.model import gguf_file
from kvflock.worker.model.quant import RTN_SPECS, QuantSpec, read_quantization_config


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: `path` is the folder, `gguf_name` the file inside it if GGUF."""

    format: Literal["hf", "gguf", "dummy"]
    path: Path
    gguf_name: str | None = None

    @property
    def gguf_path(self) -> Path:
        assert self.gguf_name is not None
        return self.path / self.gguf_name

    @cached_property
    def gguf_reader(self) -> gguf_file.GGUFFile:
        """The parsed GGUF file, opened once for config, tokenizer and tensors."""
        return gguf_file.open_gguf(self.gguf_path)


def resolve_model(model: str, load_format: str = "auto") -> ModelSource:
    """Turn the user's `model` string into a ModelSource, checking that the files exist."""
    path = demo_model_path() if model == DEMO_MODEL else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model: {model!r} does not exist (a HF folder, a .gguf file, or 'demo')")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: {path} is a file but not a .gguf file")
        return ModelSource("gguf", path.parent, path.name)
    if load_format == "dummy":
        return ModelSource("dummy", path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    has_config = (path / "config.json").exists()
    if load_format == "gguf" or (load_format == "auto" and not has_config and len(ggufs) == 1):
        if len(ggufs) != 1:
            raise ValueError(f"model: {path} must hold exactly one .gguf file, found {ggufs}")
        return ModelSource("gguf", path, ggufs[0])
    if not has_config:
        raise FileNotFoundError(f"model: {path} has no config.json (nor a single .gguf file)")
    return ModelSource("hf", path)


def _read_hf_config(source: ModelSource) -> dict[str, Any]:
    config_path = source.path / "config.json"
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc


def read_checkpoint_quantization(source: ModelSource) -> QuantSpec | None:
    """How the checkpoint's weights are quantized (GPTQ, AWQ or FP8), None for plain weights."""
    if source.format != "hf":
        return None
    return read_quantization_config(_read_hf_config(source), str(source.path / "config.json"))


def resolve_quantization(requested: str | None, source: ModelSource) -> QuantSpec | None:
    """The quantization the model runs with: the checkpoint's, or `requested` (EngineConfig's
    `quantization`) where it agrees with the checkpoint."""
    stored = read_checkpoint_quantization(source)
    if requested is None:
        return stored
    if stored is not None:
        if requested == ("fp8" if stored.fp8 else stored.method):
            return stored
        raise ValueError(f"quantization: {requested!r} does not match {source.path}, which is already quantized "
                         f"({stored.label}); leave quantization unset")
    if requested in ("gptq", "awq"):
        raise ValueError(f"quantization: {requested!r} needs a checkpoint quantized so (config.json with a "
                         f"{requested} quantization_config); {source.path} has none. Quantize it with `kvflock "
                         f"quantize`, or use int8/int4/fp8 to quantize at load")
    return RTN_SPECS[requested]


def read_model_config(source: ModelSource) -> ModelConfig:
    if source.format == "gguf":
        return gguf_file.read_config(source.gguf_reader, source.gguf_path)
    config_path = source.path / "config.json"
    hf = _read_hf_config(source)
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as exc:
        raise ValueError(f"{config_path}: missing field {exc}") from exc
