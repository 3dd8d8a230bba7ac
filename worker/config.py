"""Configuration of the engine: the model's architecture, the engine's limits, and the
per-request sampling parameters. Everything a user writes is a pydantic model, so a bad value
fails with a ValueError that names the field.

EngineConfig is the one declaration of every engine setting: its default, bounds and help text.
`kvflock serve` and `kvflock generate` make their flags from it, `kvflock serve --config FILE`
reads it from a JSON file of the same field names (what the operator mounts into worker pods),
and a test holds the CRD's engine fields to it. This module imports torch only where a setting
becomes a torch object, so the CLI and the operator read the settings without it.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvflock.shared.parallel_layout import ParallelLayout

if TYPE_CHECKING:
    import torch

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts part of a decoder: which layers route each token to `top_k` of
    `num_experts` SwiGLU experts (the other layers keep the dense MLP of ModelConfig's
    intermediate_size), and how the router's weights are formed."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    norm_topk_prob: bool  # renormalize the top-k probabilities to sum to one
    sparse_layers: tuple[int, ...]
    shared_intermediate_size: int = 0  # Qwen2-MoE's always-on shared expert (0: none)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], arch: str) -> "MoEConfig | None":
        """Mixtral: every layer, always renormalized. Qwen MoE: layer i is sparse when
        (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers (transformers' rule)."""
        layers = range(hf["num_hidden_layers"])
        # transformers 5 writes Qwen's num_experts under Mixtral's name
        num_experts = hf.get("num_experts") or hf.get("num_local_experts")
        if arch == "mixtral":
            return cls(num_experts, hf["num_experts_per_tok"], hf["intermediate_size"], True, tuple(layers))
        if arch not in ("qwen2_moe", "qwen3_moe") or not num_experts:
            return None
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        return cls(
            num_experts=num_experts,
            top_k=hf["num_experts_per_tok"],
            intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=hf.get("norm_topk_prob", False),
            sparse_layers=tuple(i for i in layers if i not in dense and (i + 1) % step == 0),
            shared_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0,
        )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from an HF config.json or GGUF metadata.
    Qwen3 adds an RMSNorm over each query and key head (`qk_norm`); MoE models add `moe`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    qk_norm: bool = False
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads: {self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict (transformers 4.x keys and 5.x `rope_parameters`)."""
        archs = hf.get("architectures") or []
        arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"architectures: {archs} is not supported; kvflock runs {sorted(_ARCHITECTURES)}"
            )
        num_heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling")
        if legacy_scaling:
            rope.update(legacy_scaling)
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", arch in ("mistral", "mixtral")) else None
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_scaling=None if rope_type == "default" else rope,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=hf.get("qkv_bias", arch in ("qwen2", "qwen2_moe")) or hf.get("attention_bias", False),
            o_bias=arch not in ("qwen2", "qwen2_moe") and hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=sliding,
            eos_token_ids=eos_ids,
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            moe=MoEConfig.from_hf(hf, arch),
        )


class EngineConfig(BaseModel):
    """What a worker runs and within which limits (the CRD's `engine` section maps onto it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        "demo", description="HF folder, .gguf file, folder with one .gguf, or 'demo' (SmolLM2-135M-Instruct)"
    )
    load_format: Literal["auto", "hf", "gguf", "dummy"] = Field(
        "auto", description="auto: from the path (a .gguf file or an HF folder); dummy: random weights"
    )
    quantization: Literal["gptq", "awq", "int8", "int4", "fp8"] | None = Field(
        None,
        description="quantization of the linear layers. None: as the checkpoint is (GPTQ, AWQ or FP8 when its "
        "config.json has such a quantization_config); gptq / awq: require a GPTQ (4 or 8 bits) / AWQ (4 bits, "
        "gemm) checkpoint; int8 (per channel) / int4 (groups of 128): weight-only, quantize an unquantized "
        "checkpoint at load, round-to-nearest (random packed weights with load_format dummy); fp8: e4m3 weights "
        "(per channel) and activations (per token, dynamic), from an FP8 checkpoint or quantized at load; needs "
        "CUDA capability 8.9+ (CPU: reference path)",
    )
    tokenizer: str | None = Field(None, description="tokenizer folder; defaults to the model's")
    chat_template: str | None = Field(
        None, description="the chat template (Jinja), or a file holding it; defaults to the tokenizer's")
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="how tool calls are read from the model's output; auto: from its chat template "
        "and special tokens (hermes when they do not tell)")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on CUDA"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    tensor_parallel_size: int = Field(
        1, ge=1, description="ranks (processes, one GPU each) that one replica spans; must divide num_heads"
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="pipeline stages (each tensor_parallel_size ranks) that split the model's layers; at "
        "most num_layers"
    )
    context_parallel_size: int = Field(
        1, ge=1, description="ranks (each tensor_parallel_size x pipeline_parallel_size ranks) that split a long "
        "prompt by sequence (ring attention) and each keep 1/context_parallel_size of every sequence's KV cache; "
        "must divide block_size"
    )
    context_parallel_min_tokens: int = Field(
        2048, ge=1, le=1048576, description="with context_parallel_size > 1: a prefill chunk of at least this many "
        "tokens is split over the context-parallel ranks; shorter chunks and decodes run whole on every rank",
    )
    expert_parallel: bool = Field(
        False, description="mixture-of-experts models with tensor_parallel_size > 1: each rank holds whole experts "
        "(num_experts / tensor_parallel_size of them) instead of a share of every expert",
    )
    max_model_len: int | None = Field(
        None, ge=1, le=1048576, description="prompt plus output tokens of one sequence; defaults to the model's context"
    )
    # 64, not vLLM's 256: decode CUDA graphs are captured for every batch size up to it (1, 2, 4, then
    # multiples of 8: 11 captures against 35), start-up time that a restarted replica pays in its
    # recovery budget, and the KV cache, not this limit, bounds the batch of long sequences anyway.
    max_num_seqs: int = Field(
        64, ge=1, le=4096, description="sequences running at once (decode CUDA graphs are captured up to it)"
    )
    max_num_batched_tokens: int = Field(
        2048, ge=1, le=1048576, description="tokens per step; longer prompts are prefilled in chunks"
    )
    block_size: Literal[1, 2, 4, 8, 16, 32, 64, 128, 256] = Field(16, description="tokens per KV block")
    num_kv_blocks: int | None = Field(None, ge=2, description="KV blocks; default from kv_cache_memory_gib")
    kv_cache_memory_gib: float | None = Field(
        None, gt=0, description="KV cache size when num_kv_blocks is unset; default: 1 GiB on CPU, on CUDA "
        "what gpu_memory_utilization leaves after the weights and a profiled forward pass"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1.0, description="share of the GPU's memory for weights, activations and KV cache"
    )
    enforce_eager: bool = Field(False, description="run decode steps eagerly instead of replaying CUDA graphs")
    async_scheduling: bool | None = Field(
        None, description="schedule and launch each step while the previous one runs on the device, its sampled "
        "tokens fed to the next step there; None: on with CUDA, one rank and no speculative decoding",
    )
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="auto: the model's dtype; fp8: float8 e4m3 with per-layer K/V scales (half of bf16)"
    )
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of prefixes seen before")
    kv_offload_cpu_gib: float = Field(
        0.0, ge=0, le=4096, description="CPU memory for KV blocks evicted from the GPU pool (0: off)"
    )
    kv_offload_disk_gib: float = Field(
        0.0, ge=0, le=65536, description="disk space for KV blocks evicted from the CPU tier (0: off)"
    )
    kv_offload_disk_path: str | None = Field(None, description="folder of the disk KV tier (kept across restarts)")
    speculative_method: Literal["ngram", "draft"] | None = Field(
        None, description="speculative decoding: ngram (prompt lookup) or draft (a small model); None: off"
    )
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="tokens drafted per step and sequence")
    prompt_lookup_min: int = Field(2, ge=1, le=16, description="ngram: shortest suffix matched")
    prompt_lookup_max: int = Field(4, ge=1, le=16, description="ngram: longest suffix matched (tried first)")
    draft_model: str | None = Field(
        None, description="draft: the small model (HF folder or .gguf) with the target's vocabulary"
    )
    seed: int = Field(0, description="seed of the engine's random state (a request's own seed wins)")
    enable_lora: bool = Field(False, description="serve LoRA adapters (PEFT folders) on the base model, each "
                              "request naming its adapter as the model")
    max_loras: int = Field(8, ge=1, le=256, description="adapters on the device at once (one step uses at most "
                           "this many)")
    max_lora_rank: int = Field(16, ge=1, le=128, description="the largest adapter rank served (device slots are "
                               "this wide)")
    max_cpu_loras: int = Field(32, ge=1, le=4096, description="adapters kept in CPU memory; others are read "
                               "from disk again when used")

    @model_validator(mode="after")
    def _check_speculative(self) -> "EngineConfig":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min: {self.prompt_lookup_min} exceeds prompt_lookup_max="
                             f"{self.prompt_lookup_max}")
        if self.speculative_method == "draft" and not self.draft_model:
            raise ValueError("draft_model: required when speculative_method='draft'")
        if self.draft_model and self.speculative_method != "draft":
            raise ValueError(f"draft_model: set, but speculative_method is {self.speculative_method!r}; "
                             "set speculative_method='draft' to use it")
        if self.async_scheduling and (self.speculative_method or self.world_size > 1):
            raise ValueError("async_scheduling: not supported with speculative decoding or a replica of several "
                             "ranks (drafting and the other ranks need each step's tokens on the host)")
        return self

    @model_validator(mode="after")
    def _check_layout(self) -> "EngineConfig":
        cp = self.context_parallel_size
        if cp > 1 and self.block_size % cp:
            raise ValueError(f"context_parallel_size: {cp} does not divide block_size={self.block_size} (each rank "
                             "keeps block_size / context_parallel_size tokens of every block)")
        return self

    @property
    def layout(self) -> ParallelLayout:
        """The replica's ranks: tensor x pipeline x context parallel."""
        return ParallelLayout(self.tensor_parallel_size, self.pipeline_parallel_size, self.context_parallel_size)

    @property
    def world_size(self) -> int:
        """Processes (one GPU each) of one replica."""
        return self.layout.world_size

    @model_validator(mode="after")
    def _check_lora(self) -> "EngineConfig":
        if self.enable_lora and self.world_size > 1:
            raise ValueError("enable_lora: LoRA adapters are served with tensor_parallel_size=1 only, and "
                             "pipeline_parallel_size=1 and context_parallel_size=1")
        if self.enable_lora and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras: {self.max_cpu_loras} is below max_loras={self.max_loras}")
        return self

    @model_validator(mode="after")
    def _offload_needs_prefix_caching(self) -> "EngineConfig":
        if (self.kv_offload_cpu_gib or self.kv_offload_disk_gib) and not self.enable_prefix_caching:
            raise ValueError("kv_offload_cpu_gib/kv_offload_disk_gib: offload needs enable_prefix_caching")
        if (self.kv_offload_cpu_gib or self.kv_offload_disk_gib) and self.world_size > 1:
            raise ValueError("kv_offload_cpu_gib/kv_offload_disk_gib: offload copies rank 0's KV only; "
                             "use it with tensor_parallel_size, pipeline_parallel_size and context_parallel_size 1")
        if self.kv_offload_disk_gib and not self.kv_offload_disk_path:
            raise ValueError("kv_offload_disk_path: required when kv_offload_disk_gib > 0")
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "EngineConfig":
        """The settings of an engine config file (a JSON object of this model's fields), with
        `overrides` (e.g. command-line flags) taking precedence. Errors name the file and field."""
        path = Path(path)
        try:
            settings = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the engine config file ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: must be a JSON object of engine settings, got {type(settings).__name__}")
        try:
            return cls.model_validate({**settings, **overrides})
        except ValidationError as exc:
            in_file = any(e["loc"] and e["loc"][0] not in overrides for e in exc.errors())
            raise ValueError(f"{path}: {describe_errors(exc)}" if in_file else describe_errors(exc)) from None

    def torch_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> "torch.dtype":
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


def describe_errors(error: ValidationError) -> str:
    """A one-line summary of a settings model's validation errors, each naming its field."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif "input" in item and where and item["type"] != "missing":
            message += f" (got {item['input']!r})"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


class StructuredOutput(BaseModel):
    """A constraint on the generated text, enforced token by token: exactly one field is set.
    The OpenAI fields (`response_format`) and vLLM's (`structured_outputs`, `guided_*`) map onto it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = Field(None, description="JSON that validates against this JSON Schema")
    json_object: bool = Field(False, description="any JSON object")
    regex: str | None = Field(None, description="text matching this regular expression")
    choice: list[str] | None = Field(None, min_length=1, description="exactly one of these strings")
    grammar: str | None = Field(None, description="text of this EBNF grammar")

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutput":
        given = [name for name, value in self if value not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"exactly one of json_schema, json_object, regex, choice, grammar must be set; got "
                             f"{given or 'none'}")
        return self


class SamplingParams(BaseModel):
    """How one request's tokens are chosen and when it stops (OpenAI and vLLM semantics)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, le=128, description="completions per prompt")
    max_tokens: int | None = Field(16, ge=1, description="new tokens at most; None: up to max_model_len")
    min_tokens: int = Field(0, ge=0, description="new tokens before EOS/stop tokens may end it")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="the range torch's generators take")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the output)")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives to report per token")
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = Field(
        None, description="token id -> added to its logit before sampling, in [-100, 100] (OpenAI's range)")
    structured_output: StructuredOutput | None = Field(None, description="constrain the output to a grammar")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (v or {}).items():
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"token {token}: a bias of {bias}; token ids are >= 0 and biases in [-100, 100]")
        return v or None

    @model_validator(mode="after")
    def _min_below_max(self) -> "SamplingParams":
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Penalties read the tokens generated so far, so each step needs the last one's value."""
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)
