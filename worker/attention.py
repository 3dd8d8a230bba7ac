"""The attention backend interface: how a layer's attention reads and writes the paged KV cache.

The model calls `backend.forward` once per layer; the runner builds one `AttentionMetadata`
per step. The torch backend runs the plain-torch references of kvfleet.kernels; a faster
backend (Triton on CUDA) implements the same two methods.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from kvfleet.kernels.paged_attention import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)


@dataclass
class AttentionMetadata:
    """Where each new token goes and what each sequence attends to, for one step.

    slot_mapping: [t] int64, `block_id * block_size + offset` of each new token (-1 skips).
    block_tables: [b, max_blocks] int32, padded with block 0.
    context_lens: [b] int32, tokens of each sequence in the cache after this step's writes.
    cu_seqlens_q: [b + 1] int32, offsets of each sequence's new tokens in the flat batch.
    is_decode: every sequence has exactly one new token.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    is_decode: bool


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write k, v ([t, hkv, d]) into `kv_layer`, then attend q ([t, hq, d]); -> [t, hq, d]."""
        ...


class TorchAttentionBackend:
    """Plain torch on any device: the reference path, and the engine's path on CPU."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv_ref(k, v, kv_layer, meta.slot_mapping)
        if meta.is_decode:
            return paged_decode_attention_ref(q, kv_layer, meta.block_tables, meta.context_lens, scale)
        return paged_prefill_attention_ref(
            q, k, v, kv_layer, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, scale
        )


def select_attention_backend(device: torch.device) -> AttentionBackend:
    """The fastest backend available on `device`."""
    return TorchAttentionBackend()
