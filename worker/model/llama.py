"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Parameter names follow the Hugging Face checkpoints, so a safetensors state dict loads as is.
The forward pass works on a flat batch: all sequences' new tokens concatenated, with their
positions and the attention metadata that says where their KV lives. Under tensor parallelism
(`group` of several ranks) each rank builds the same modules with its slice of the heads, the
MLP and the vocabulary (kvfleet.worker.model.parallel).
"""

import torch
import torch.nn.functional as F
from torch import nn

from kvfleet.worker.attention import AttentionBackend, AttentionMetadata
from kvfleet.worker.config import ModelConfig
from kvfleet.worker.model.parallel import (
    SINGLE_RANK,
    ColumnParallelLinear,
    HeadSplit,
    ParallelLMHead,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
)
from kvfleet.worker.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(acc)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """This rank's query heads and the KV heads they read; the output projection sums the ranks."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend, group: TPGroup) -> None:
        super().__init__()
        heads = HeadSplit.of(cfg, group)
        d = cfg.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_q, heads.num_kv, d
        self.scale = d**-0.5
        self.backend = backend
        q, kv = (heads.q_start * d, heads.num_q * d), (heads.kv_start * d, heads.num_kv * d)
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * d, cfg.qkv_bias, *q)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * d, cfg.qkv_bias, *kv)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * d, cfg.qkv_bias, *kv)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, cfg.o_bias, group, *q)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache[:, self.layer_idx], meta, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU over this rank's share of the intermediate features."""

    def __init__(self, cfg: ModelConfig, group: TPGroup) -> None:
        super().__init__()
        size = cfg.intermediate_size // group.world_size
        part = (group.rank * size, size)
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, *part)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, *part)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, group, *part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend, group: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, backend, group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, group)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, group: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend, group) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.rotary, kv_cache, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head. `forward` returns hidden states; `logits` projects selected rows.

    `group` is this process's tensor-parallel rank; the default, one rank, is the whole model.
    """

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, group: TPGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.config = cfg
        self.group = group
        self.model = LlamaModel(cfg, backend, group)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, group)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_cache, meta)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary on rank 0; None on the other ranks."""
        logits = self.lm_head(hidden)
        if logits is None:
            return None
        return logits if logits.dtype == torch.float64 else logits.float()
