"""How large the KV cache and the tiers below it are: the context length served, the number of
GPU blocks (from the config, or by profiling GPU memory with one step of the largest size),
and the CPU and disk tiers sized from the config's GiB."""

import hashlib
import logging
from pathlib import Path

import torch

from kvflock.worker.attention import AttentionMetadata
from kvflock.worker.config import EngineConfig, ModelConfig
from kvflock.worker.kv.disk import DiskBlockStore
from kvflock.worker.kv.tiers import OffloadTiers
from kvflock.worker.model.loader import LoadedModel
from kvflock.worker.runner import allocate_kv_cache, kv_bytes_per_block

log = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 2**30
_TP_ACTIVATION_MARGIN_BYTES = 2 * 2**30


def max_model_len(config: EngineConfig, cfg: ModelConfig) -> int:
    """The longest sequence served: the config's, within the model's context."""
    limit = cfg.max_position_embeddings
    if cfg.sliding_window:
        limit = min(limit, cfg.sliding_window)  # sliding-window attention is not implemented
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len: {config.max_model_len} exceeds the model's context of {limit} tokens")
    return config.max_model_len


def num_kv_blocks(config: EngineConfig, loaded: LoadedModel, kv_dtype: torch.dtype, model_len: int,
                  draft: LoadedModel | None) -> int:
    """GPU KV blocks: num_kv_blocks as given, else what the memory for the KV cache holds (the
    draft model's pool has as many blocks and takes its share), never more than every running
    sequence at full length can use."""
    needed = -(-model_len // config.block_size) + 1  # one full sequence, plus block 0
    if config.num_kv_blocks is not None:
        if config.num_kv_blocks < needed:
            raise ValueError(
                f"num_kv_blocks: {config.num_kv_blocks} blocks of {config.block_size} tokens cannot hold "
                f"one sequence of max_model_len={model_len}; use at least {needed} or lower max_model_len"
            )
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(loaded.config, config.block_size // loaded.cp_size, kv_dtype, loaded.tp_size,
                                   loaded.num_layers)
    if draft is not None:
        per_block += kv_bytes_per_block(draft.config, config.block_size, draft.dtype)
    useful = config.max_num_seqs * (needed - 1) + 1
    if config.kv_cache_memory_gib is not None:
        field, kv_bytes = "kv_cache_memory_gib", int(config.kv_cache_memory_gib * 2**30)
    elif loaded.device.type == "cuda":
        field, kv_bytes = "gpu_memory_utilization", _profile_kv_bytes(config, loaded, kv_dtype, model_len)
    else:
        field, kv_bytes = "kv_cache_memory_gib", _CPU_KV_CACHE_BYTES
    blocks = min(kv_bytes // per_block, useful)
    if blocks < needed:
        raise ValueError(
            f"{field}: leaves {kv_bytes / 2**30:.2f} GiB for the KV cache, {blocks} blocks, fewer than the "
            f"{needed} that one sequence of max_model_len={model_len} needs"
        )
    return blocks


def _profile_kv_bytes(config: EngineConfig, loaded: LoadedModel, kv_dtype: torch.dtype, model_len: int) -> int:
    """GPU memory left for the KV cache: gpu_memory_utilization of the device, less what is
    in use now (weights, CUDA context, other processes) and the peak of the largest step,
    measured by running one (a prefill of max_num_batched_tokens tokens and the sampler's
    sort over every row that can sample at once). The decode CUDA graphs' pool is covered
    by the same margin once more."""
    device = loaded.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    if loaded.replica is None:
        _profile_step(config, loaded, kv_dtype, model_len)
        activations = torch.cuda.max_memory_allocated(device) - before
    else:  # the other ranks would have to join the forward pass; assume a generous margin
        activations = _TP_ACTIVATION_MARGIN_BYTES
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    kv_bytes = int(total * config.gpu_memory_utilization) - (total - free) - 2 * activations
    log.info("GPU memory: %.1f GiB total, %.1f GiB in use, %.2f GiB peak of a step; %.1f GiB for the KV cache "
             "at gpu_memory_utilization=%.2f", total / 2**30, (total - free) / 2**30, activations / 2**30,
             max(kv_bytes, 0) / 2**30, config.gpu_memory_utilization)
    return max(kv_bytes, 0)


@torch.inference_mode()
def _profile_step(config: EngineConfig, loaded: LoadedModel, kv_dtype: torch.dtype, model_len: int) -> None:
    device = loaded.device
    tokens = min(config.max_num_batched_tokens, model_len)
    # Rows that sample: one per sequence, 1 + k for a sequence verifying k drafts.
    per_seq = 1 + config.num_speculative_tokens if config.speculative_method else 1
    rows = min(config.max_num_seqs * per_seq, tokens)
    kv_cache = allocate_kv_cache(loaded.config, 1, config.block_size, kv_dtype, device)
    meta = AttentionMetadata(  # one sequence; nothing written (slot -1), every read from block 0
        slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros((1, -(-tokens // config.block_size)), dtype=torch.int32, device=device),
        context_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        is_decode=tokens == 1,
    )
    model = loaded.model
    ids = torch.zeros(tokens, dtype=torch.int64, device=device)
    hidden = model(ids, torch.arange(tokens, device=device), kv_cache, meta)
    logits = model.logits(hidden[-rows:])
    logits.sort(dim=-1, descending=True)
    torch.cuda.synchronize(device)


def offload_tiers(config: EngineConfig, loaded: LoadedModel, kv_cache: torch.Tensor) -> OffloadTiers | None:
    """The CPU and disk tiers below the KV cache, sized in blocks from the config's GiB; None
    when neither is configured."""
    if not config.kv_offload_cpu_gib and not config.kv_offload_disk_gib:
        return None
    block_bytes = kv_cache[0].numel() * kv_cache.element_size()
    disk = None
    if config.kv_offload_disk_gib:
        assert config.kv_offload_disk_path is not None
        identity = "|".join([repr(loaded.config), str(loaded.dtype), str(kv_cache.dtype), str(tuple(kv_cache.shape[1:])),
                             _weights_fingerprint(loaded)])
        disk = DiskBlockStore(Path(config.kv_offload_disk_path), int(config.kv_offload_disk_gib * 2**30) // block_bytes,
                              identity.encode(), block_bytes)
        log.info("disk KV tier at %s: %d blocks, %d found from earlier runs", config.kv_offload_disk_path,
                 disk.capacity_blocks, len(disk))
    return OffloadTiers(kv_cache, int(config.kv_offload_cpu_gib * 2**30) // block_bytes, disk)


def _weights_fingerprint(loaded: LoadedModel) -> str:
    """A hash of a sample of the weights: the disk tier must never serve another
    checkpoint's KV, even one with the same architecture."""
    sample = loaded.model.model.embed_tokens.weight[:4].detach().float().cpu().numpy().tobytes()
    return hashlib.sha256(sample).hexdigest()
