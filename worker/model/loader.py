"""Loading a model's weights onto its device: from Hugging Face safetensors (one file or a
sharded index), GGUF files, and random ("dummy") weights of any config for benchmarks. Where
the model is and what it is: kvflock.worker.model.source; its tokenizer:
kvflock.worker.model.tokenizer.

Under tensor parallelism each rank loads only its slices: from safetensors it reads just
those bytes (`get_slice`), from GGUF it dequantizes each tensor and keeps its slice. A pipeline
stage loads only its layers' tensors. On a terminal, rank 0 shows each weight file's (shard's)
progress on one updating line.
"""

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from kvflock.worker.attention import AttentionBackend
from kvflock.worker.config import EngineConfig, ModelConfig
from kvflock.worker.model import gguf_file
from kvflock.worker.model.llama import LlamaForCausalLM
from kvflock.worker.model.moe import param_name
from kvflock.worker.model.parallel import SINGLE_RANK, Shard, TPGroup, check_tp_size
from kvflock.worker.model.fp8 import Fp8Linear, check_fp8_device, expand_scales
from kvflock.worker.model.quant import QuantizedLinear, QuantSpec, drop_trivial_g_idx, replace_linears
from kvflock.worker.model.source import (
    ModelSource,
    read_checkpoint_quantization,
    read_model_config,
    resolve_model,
    resolve_quantization,
)
from kvflock.worker.model.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from kvflock.worker.tp import Replica

log = logging.getLogger(__name__)


class LoadProgress:
    """One updating line per weight file on a terminal: `name (shard i/n): done/total tensors`.
    Quiet when the stream is not a terminal (a pod's log, a test): the one line `load_model`
    logs at the end says what was loaded and how long it took."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = 0.0

    def update(self, shard: str, index: int, shards: int, done: int, total: int) -> None:
        """`done` of the shard's `total` tensors are in place; its line ends once all are."""
        now = time.monotonic()
        if not self.tty or (done < total and now - self._last < 0.1):
            return
        self._last = now
        end = "\n" if done >= total else ""
        self.stream.write(f"\rloading {shard} (shard {index}/{shards}): {done}/{total} tensors\033[K{end}")
        self.stream.flush()


def _counted(tensors: Iterator[Any], shard: str, index: int, shards: int, total: int,
             progress: LoadProgress | None) -> Iterator[Any]:
    """`tensors` as they are, telling `progress` after each one has been placed."""
    for done, item in enumerate(tensors, 1):
        yield item
        if progress is not None:
            progress.update(shard, index, shards, done, total)


@dataclass
class LoadedModel:
    """Everything read from disk for one model; engines with other limits can share it."""

    source: ModelSource
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Any
    dtype: torch.dtype
    device: torch.device
    # Rank 0 of a replica of several ranks: the other ranks' processes (kvflock.worker.tp).
    replica: "Replica | None" = None
    quantization: QuantSpec | None = None  # the linear layers' weights, when quantized

    @property
    def tp_size(self) -> int:
        return self.model.group.world_size

    @property
    def cp_size(self) -> int:
        """Context-parallel ranks: each keeps block_size / cp_size tokens of every KV block."""
        context = None if self.replica is None else self.replica.context
        return 1 if context is None else context.group.size

    @property
    def num_layers(self) -> int:
        """The layers this rank holds: its pipeline stage's (the first stage holds the most)."""
        return len(self.model.model.stage)


def load(config: EngineConfig, backend: AttentionBackend, group: TPGroup | None = None,
         stage: range | None = None) -> LoadedModel:
    """Resolve, read and place the model and its tokenizer as `config` asks.

    With a replica of several ranks (config.world_size > 1) and no `group`, this process becomes
    rank 0 of a new replica: kvflock.worker.tp starts the other ranks, which load their shards
    meanwhile. With a `group`, this process loads its rank's shard of the layers of `stage`
    (default all; the tokenizer only on rank 0).
    """
    if group is None:
        if config.world_size > 1:
            from kvflock.worker.tp import load_replica

            return load_replica(config, backend)
        group = SINGLE_RANK
    source = resolve_model(config.model, config.load_format)
    model_config = read_model_config(source)
    check_tp_size(model_config, group.world_size, config.expert_parallel)
    quantization = resolve_quantization(config.quantization, source)
    if quantization is not None and model_config.moe is not None:
        raise ValueError(f"quantization: {quantization.label} is not supported for mixture-of-experts models")
    stage = stage or range(model_config.num_layers)
    rank_0 = group.rank == 0 and stage.start == 0
    tokenizer = load_tokenizer(source, config.tokenizer) if source.format != "dummy" and rank_0 else None
    dtype, device = config.torch_dtype(), config.torch_device()
    progress = LoadProgress() if rank_0 else None
    model = load_model(source, model_config, dtype, device, backend, config.seed, group, quantization, progress,
                       config.expert_parallel, stage)
    return LoadedModel(source, model_config, model, tokenizer, dtype, device, quantization=quantization)


def load_model(
    source: ModelSource,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend,
    seed: int = 0,
    group: TPGroup = SINGLE_RANK,
    quantization: QuantSpec | None = None,
    progress: LoadProgress | None = None,
    expert_parallel: bool = False,
    stage: range | None = None,
) -> LlamaForCausalLM:
    """Build `group`'s rank of the model (of the layers of `stage`, default all) on `device` and
    fill its weights from `source` (random for dummy). With `quantization`, the decoder's
    projections are QuantizedLinear (or Fp8Linear) layers: read from a GPTQ, AWQ (FP8) checkpoint
    and repacked for the kernels, random for dummy, else quantized once loaded."""
    start = time.perf_counter()
    if quantization is not None and quantization.fp8:
        check_fp8_device(device)
    packed = quantization is not None and (source.format == "dummy" or read_checkpoint_quantization(source) is not None)
    with torch.device("meta"):  # no memory and no random init until the real weights arrive
        model = LlamaForCausalLM(cfg, backend, group, expert_parallel, stage).to(dtype)
        if packed:
            assert quantization is not None
            replace_linears(model, quantization, backend.triton_pointwise)
    # Module.to_empty would allocate through torch's meta-tensor reference code, whose first use
    # imports sympy: 0.4 s of CPU on every worker start. Plain torch.empty allocates the same.
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.tie_weights()
    if source.format == "dummy":
        _fill_dummy(model, seed)
    else:
        shards = {
            f"{prefix}.{name}": shard
            for prefix, module in model.named_modules()
            for name, shard in getattr(module, "shards", {}).items()
        }
        head_from_embedding = (cfg.tie_word_embeddings and model.lm_head is not None
                               and model.model.embed_tokens is None)
        if head_from_embedding:  # the last stage without the first reads the tied head from the embedding
            shards["model.embed_tokens.weight"] = shards["lm_head.weight"]
        if source.format == "gguf":
            tensors = (
                (name, tuple(t.shape), _slice(t, shards.get(name)))
                for name, t in gguf_file.iter_tensors(source.gguf_reader, cfg, source.gguf_path)
            )
            total = gguf_file.tensor_count(source.gguf_reader)
            tensors = _counted(tensors, source.gguf_path.name, 1, 1, total, progress)
        else:
            tensors = _iter_safetensors(source.path, shards, progress)
            if packed and quantization is not None and quantization.fp8:
                fp8_layers = {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
                tensors = expand_scales(tensors, fp8_layers, str(source.path))
            elif packed:
                assert quantization is not None
                tensors = drop_trivial_g_idx(tensors, quantization, str(source.path))
        if head_from_embedding:
            tensors = (("lm_head.weight" if name == "model.embed_tokens.weight" else name, shape, part)
                       for name, shape, part in tensors)
        _load_weights(model, tensors, str(source.gguf_path if source.gguf_name else source.path), shards)
        if packed:
            for module in model.modules():
                if isinstance(module, QuantizedLinear):
                    module.repack()
        if quantization is not None and not packed:
            replace_linears(model, quantization, backend.triton_pointwise, quantize=True)
    model.fuse_projections()
    log.info(
        "loaded %s weights%s (rank %d of %d, layers %d-%d) from %s in %.2fs",
        source.format, f", {quantization.label}" if quantization else "", group.rank, group.world_size,
        model.model.stage.start, model.model.stage.stop - 1,
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
            if name == "lm_head.weight" or "rotary_emb" in name or not model.holds(name):
                continue  # tied head stored anyway, precomputed rotary buffers, another rank's expert
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


def _iter_safetensors(folder: Path, shards: dict[str, Shard], progress: LoadProgress | None = None,
                      ) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
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
    for index, name in enumerate(files, 1):
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in the index but missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                for key in _counted(iter(keys), name, index, len(files), len(keys), progress):
                    tensor, hf_name = f.get_slice(key), param_name(key)
                    yield hf_name, tuple(tensor.get_shape()), _slice(tensor, shards.get(hf_name))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        except Exception as exc:  # safetensors raises its own SafetensorError on bad headers
            if type(exc).__name__ != "SafetensorError":
                raise
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def _fill_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights with a realistic scale, so activations stay finite in any dtype."""
    quantized = [(f"{name}.", m) for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, Fp8Linear))]
    for _, module in quantized:
        module.fill_random(torch.Generator(device=next(module.parameters()).device).manual_seed(seed))
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
