"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, and the MoE models
Qwen2-MoE, Qwen3-MoE and Mixtral, whose experts live in kvflock.worker.model.moe) over a paged
KV cache.

Parameter names follow the Hugging Face checkpoints, so a safetensors state dict loads as is.
The forward pass works on a flat batch: all sequences' new tokens concatenated, with their
positions and the attention metadata that says where their KV lives. Under tensor parallelism
(`group` of several ranks) each rank builds the same modules with its slice of the heads, the
MLP and the vocabulary (kvflock.worker.model.parallel). Under pipeline parallelism each stage
builds only its run of layers (`stage`), the first stage the embedding and the last the final
norm and LM head; kvflock.worker.parallel.pipeline runs a stage's part of the forward pass.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kvflock.kernels.activation import silu_and_mul
from kvflock.kernels.norm import rms_norm
from kvflock.worker.attention import AttentionBackend, AttentionMetadata
from kvflock.worker.config import ModelConfig
from kvflock.worker.model.moe import SparseMoE, expert_of
from kvflock.worker.model.parallel import (
    SINGLE_RANK,
    ColumnParallelLinear,
    HeadSplit,
    ParallelLMHead,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    input_major,
)
from kvflock.worker.model.quant import QUANTIZED_LINEARS
from kvflock.worker.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """RMSNorm, optionally of `x + residual` (then it also returns that sum, the new residual).
    With `triton` it runs kvflock.kernels' fused kernel; else in torch, rounding like HF."""

    def __init__(self, dim: int, eps: float, triton: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.triton = triton

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.triton:
            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(acc)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, x)


class Attention(nn.Module):
    """This rank's query heads and the KV heads they read; the output projection sums the ranks.
    `kv_index`: the layer's place in its stage's KV cache (its index, less the stage's first layer)."""

    def __init__(self, cfg: ModelConfig, kv_index: int, backend: AttentionBackend, group: TPGroup) -> None:
        super().__init__()
        heads = HeadSplit.of(cfg, group)
        d = cfg.head_dim
        self.kv_index = kv_index
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_q, heads.num_kv, d
        self.scale = d**-0.5
        # An fp8 KV cache stores K/scale and V/scale. 1.0 (no calibration) keeps values within
        # e4m3's +-448 for the models we run; calibrated per-layer scales can be set here.
        self.k_scale = self.v_scale = 1.0
        self.backend = backend
        q, kv = (heads.q_start * d, heads.num_q * d), (heads.kv_start * d, heads.num_kv * d)
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * d, cfg.qkv_bias, *q)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * d, cfg.qkv_bias, *kv)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * d, cfg.qkv_bias, *kv)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, cfg.o_bias, group, *q)
        # Qwen3 normalizes each query and key head before the rotary embedding.
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, backend.triton_pointwise) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, backend.triton_pointwise) if cfg.qk_norm else None
        self._qkv: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._qkv_sizes = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]

    def fuse_qkv(self) -> None:
        """One matmul for q, k and v (as MLP.fuse_gate_up): at decode batch sizes three small
        matmuls leave the memory bus idle between them."""
        projections = [self.q_proj, self.k_proj, self.v_proj]
        if isinstance(self.q_proj, QUANTIZED_LINEARS):
            if self.q_proj.bias is None:
                self._qkv = type(self.q_proj).fuse(projections).forward
            return
        weight = torch.cat([p.weight.data for p in projections])
        bias = torch.cat([p.bias.data for p in projections]) if self.q_proj.bias is not None else None
        for p, w in zip(projections, weight.split(self._qkv_sizes)):
            p.weight.data = w
        if bias is not None:
            for p, b in zip(projections, bias.split(self._qkv_sizes)):
                p.bias.data = b
        self._qkv = partial(F.linear, weight=weight, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        if self.backend.triton_pointwise and self._qkv is not None:  # the kernels take strided q, k, v
            q, k, v = self._qkv(x).split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(t, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k, triton=self.backend.triton_pointwise)
        out = self.backend.forward(q, k, v, kv_cache[:, self.kv_index], meta, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU over this rank's share of the intermediate features (`intermediate_size`, default
    the model's). With `reduce_output` False the ranks' partial outputs are left to the caller to
    sum (a MoE block's shared expert, summed with the experts).

    `fuse_gate_up` makes the gate and up weights two halves of one buffer (the parameters stay,
    as views), so that one matmul yields `[gate | up]` for the fused silu_and_mul kernel. The
    same holds for quantized projections: their packed tensors are concatenated along the
    output features, which carry their own scales and zero points.
    """

    def __init__(
        self, cfg: ModelConfig, group: TPGroup, triton: bool, intermediate_size: int | None = None,
        reduce_output: bool = True,
    ) -> None:
        super().__init__()
        full = intermediate_size or cfg.intermediate_size
        size = full // group.world_size
        part = (group.rank * size, size)
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, full, cfg.mlp_bias, *part)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, full, cfg.mlp_bias, *part)
        down_group = group if reduce_output else SINGLE_RANK
        self.down_proj = RowParallelLinear(full, cfg.hidden_size, cfg.mlp_bias, down_group, *part)
        self.triton = triton
        self._gate_up: Callable[[torch.Tensor], torch.Tensor] | None = None

    def fuse_gate_up(self) -> None:
        if self.gate_proj.bias is not None:
            return  # biased MLPs keep two matmuls
        if isinstance(self.gate_proj, QUANTIZED_LINEARS):
            self._gate_up = type(self.gate_proj).fuse([self.gate_proj, self.up_proj]).forward
            return
        fused = torch.cat([self.gate_proj.weight.data, self.up_proj.weight.data])
        rows = self.gate_proj.weight.shape[0]
        self.gate_proj.weight.data, self.up_proj.weight.data = fused[:rows], fused[rows:]
        self._gate_up = partial(F.linear, weight=fused)

    def store_input_major(self) -> None:
        """See LlamaForCausalLM._store_input_major."""
        if not isinstance(self.down_proj, QUANTIZED_LINEARS):
            self.down_proj.weight.data = input_major(self.down_proj.weight.data)
        if self._gate_up is None or isinstance(self.gate_proj, QUANTIZED_LINEARS):
            return
        fused = input_major(torch.cat([self.gate_proj.weight.data, self.up_proj.weight.data]))
        rows = self.gate_proj.weight.shape[0]
        self.gate_proj.weight.data, self.up_proj.weight.data = fused[:rows], fused[rows:]
        self._gate_up = partial(F.linear, weight=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton and self._gate_up is not None:
            return self.down_proj(silu_and_mul(self._gate_up(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, kv_index: int, backend: AttentionBackend, group: TPGroup,
        expert_parallel: bool,
    ) -> None:
        super().__init__()
        triton = backend.triton_pointwise
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, triton)
        self.self_attn = Attention(cfg, kv_index, backend, group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, triton)
        self.mlp: MLP | SparseMoE
        if cfg.moe is not None and layer_idx in cfg.moe.sparse_layers:
            shared = cfg.moe.shared_intermediate_size
            shared_expert = MLP(cfg, group, triton, shared, reduce_output=False) if shared else None
            self.mlp = SparseMoE(cfg, group, triton, expert_parallel, shared_expert)
        else:
            self.mlp = MLP(cfg, group, triton)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the previous layer's output, residual the stream before it (None at layer 0):
        each norm adds them first, so the add fuses into the norm's kernel."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rotary, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """The decoder layers of `stage` (all by default), with the embedding when the stage is the
    first and the final norm when it is the last. A layer of another stage is an empty
    placeholder, so that parameter names stay the checkpoint's (`layers.<index>.`)."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, group: TPGroup, expert_parallel: bool,
                 stage: range) -> None:
        super().__init__()
        self.stage = stage
        first, last = stage.start == 0, stage.stop == cfg.num_layers
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group) if first else None
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, i - stage.start, backend, group, expert_parallel) if i in stage else nn.Module()
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend.triton_pointwise) if last else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    @property
    def held_layers(self) -> list[DecoderLayer]:
        """The stage's layers, in order."""
        return [self.layers[i] for i in self.stage]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The whole decoder (a model of one stage)."""
        assert self.embed_tokens is not None and self.norm is not None, "a pipeline stage runs run_layers"
        x, residual = self.run_layers(self.embed_tokens(input_ids), None, positions, kv_cache, meta)
        out, _ = self.norm(x, residual)
        return out

    def run_layers(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                   kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's layers over the previous stage's output and residual stream (x: the
        embedding and residual None on the first stage)."""
        for layer in self.held_layers:
            x, residual = layer(x, residual, positions, self.rotary, kv_cache, meta)
        assert residual is not None
        return x, residual


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head. `forward` returns hidden states; `logits` projects selected rows.

    `group` is this process's tensor-parallel rank; the default, one rank, is the whole model.
    `expert_parallel`: with several ranks, each holds whole experts rather than a share of every
    expert (kvflock.worker.model.moe). `stage`: the layers this pipeline stage holds (default all);
    the LM head lives on the last stage.
    """

    def __init__(
        self, cfg: ModelConfig, backend: AttentionBackend, group: TPGroup = SINGLE_RANK, expert_parallel: bool = False,
        stage: range | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.group = group
        self.model = LlamaModel(cfg, backend, group, expert_parallel, stage or range(cfg.num_layers))
        last = self.model.norm is not None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, group) if last else None
        self.tie_weights()

    def tie_weights(self) -> None:
        """A tied LM head shares the embedding's weight when this stage holds both."""
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_cache, meta)

    def fuse_projections(self) -> None:
        """Once the weights are loaded: one q/k/v and one gate/up matmul per layer (see
        Attention.fuse_qkv and MLP.fuse_gate_up); used on the Triton path. On CUDA the weights
        cuBLAS reads faster input-major are then stored so."""
        cuda = next(self.parameters()).is_cuda
        for layer in self.model.held_layers:
            layer.self_attn.fuse_qkv()
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.fuse_experts(input_major_weights=cuda)
                if layer.mlp.shared_expert is not None:
                    layer.mlp.shared_expert.fuse_gate_up()
            else:
                layer.mlp.fuse_gate_up()
        if cuda:
            self._store_input_major()

    def _store_input_major(self) -> None:
        """Store o_proj, gate/up, down and an untied LM head as [in, out] in memory (the same
        [out, in] matrices to every caller). On an H100 at decode batch sizes, with the weights
        cold in L2, cuBLAS then reads them at 2.4-3.0 TB/s against 2.2-2.9 TB/s, about 0.2 ms of a
        6.3 ms Llama-3-8B decode step; q/k/v reads a little slower so and stays (measured
        2026-11-26, bench/results/engine-h100.md). Quantized and tied weights stay as they are."""
        for layer in self.model.held_layers:
            o_proj = layer.self_attn.o_proj
            if not isinstance(o_proj, QUANTIZED_LINEARS):
                o_proj.weight.data = input_major(o_proj.weight.data)
            mlp = layer.mlp.shared_expert if isinstance(layer.mlp, SparseMoE) else layer.mlp
            if mlp is not None:
                mlp.store_input_major()
        embed = self.model.embed_tokens
        if self.lm_head is not None and (embed is None or self.lm_head.weight is not embed.weight):
            self.lm_head.weight.data = input_major(self.lm_head.weight.data)

    def holds(self, name: str) -> bool:
        """Whether this rank keeps the checkpoint tensor `name` (false for the layers of other
        pipeline stages and for the experts that expert parallelism puts on other ranks)."""
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and layer.isdigit() and int(layer) not in self.model.stage:
            return False
        for prefix, module in (("model.embed_tokens.", self.model.embed_tokens), ("model.norm.", self.model.norm),
                               ("lm_head.", self.lm_head)):
            if name.startswith(prefix):
                return module is not None
        where = expert_of(name)
        if where is None:
            return True
        mlp = self.model.layers[where[0]].mlp
        return not isinstance(mlp, SparseMoE) or mlp.holds_expert(where[1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary on rank 0 of the last stage; None on the other ranks."""
        assert self.lm_head is not None, "only the last pipeline stage has the LM head"
        logits = self.lm_head(hidden)
        if logits is None:
            return None
        return logits if logits.dtype == torch.float64 else logits.float()
