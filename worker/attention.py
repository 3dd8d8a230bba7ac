"""The attention backend interface: how a layer's attention reads and writes the paged KV cache.

The model calls `backend.forward` once per layer; the runner builds one `AttentionMetadata`
per step. The torch backend runs the plain-torch references of kvflock.kernels; the Triton
backend runs their kernels, and `select_attention_backend` picks it on CUDA.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from kvflock.kernels import paged_attention
from kvflock.kernels._triton import HAS_TRITON
from kvflock.kernels.paged_attention import (
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
    triton_pointwise: bool  # whether the model should run its norms/rotary/activation in Triton

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        """Write k, v ([t, hkv, d]) into `kv_layer`, then attend q ([t, hq, d]); -> [t, hq, d].

        `k_scale`/`v_scale`: the layer's scales of an fp8 cache (stored value = value / scale).
        """
        ...


class TorchAttentionBackend:
    """Plain torch on any device: the reference path, and the engine's path on CPU."""

    triton_pointwise = False  # the model's norms, rotary and activation stay in torch too

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        write_kv_ref(k, v, kv_layer, meta.slot_mapping, k_scale, v_scale)
        if meta.is_decode:
            return paged_decode_attention_ref(
                q, kv_layer, meta.block_tables, meta.context_lens, scale, k_scale, v_scale
            )
        return paged_prefill_attention_ref(
            q, k, v, kv_layer, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, scale,
            k_scale, v_scale,
        )


class TritonAttentionBackend:
    """The Triton kernels of kvflock.kernels.paged_attention: the engine's path on CUDA.

    With it the model also runs kvflock.kernels' rms_norm (fused residual add), rotary and
    silu_and_mul kernels (`triton_pointwise`).

    The kernels are looked up on their module at each call (not bound at import), so a test
    process that reloads the module under Triton's interpreter runs the reloaded kernels.
    """

    triton_pointwise = True

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        paged_attention.write_kv(k, v, kv_layer, meta.slot_mapping, k_scale, v_scale)
        if meta.is_decode:
            return paged_attention.paged_decode_attention(
                q, kv_layer, meta.block_tables, meta.context_lens, scale, k_scale, v_scale
            )
        return paged_attention.paged_prefill_attention(
            q, k, v, kv_layer, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, scale,
            k_scale, v_scale,
        )


def select_attention_backend(device: torch.device) -> AttentionBackend:
    """The fastest backend available on `device`: Triton on CUDA when Triton is installed,
    plain torch otherwise."""
    if torch.device(device).type == "cuda" and HAS_TRITON:
        return TritonAttentionBackend()
    return TorchAttentionBackend()
