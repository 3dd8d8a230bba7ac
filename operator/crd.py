"""The InferenceService custom resource: pydantic models of its spec and status.

These models are the single source of the CRD: `kvflock.operator.render` turns them into the
CustomResourceDefinition that `kvflock crds` writes to crds/inferenceservice.yaml, and the
operator parses every object with them, so a spec that slips past the API server's schema
(an old CRD, a cluster without CEL) still fails here, naming the field.
Cross-field rules exist twice on purpose: as CEL (`x-kubernetes-validations`) for the API
server and as model validators for the operator; `tests/operator/test_crd.py` checks both.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvflock.shared.hub import SOURCE_PATTERN as HUB_SOURCE_PATTERN
from kvflock.shared.parallel_layout import ParallelLayout

GROUP = "kvflock.dev"
VERSION = "v1alpha1"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["infsvc"]
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_IMAGE = "ghcr.io/kvflock/worker:0.1.0"
# Children are named <name>-w-<n>, <name>-workers, ...: the longest suffix must still fit
# in a 63-character DNS label.
MAX_NAME_LENGTH = 50

_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
_DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    validation = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


class _Model(BaseModel):
    """Strict camelCase models: unknown fields are errors, as with a structural schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class SecretKeyRef(_Model):
    """One key of a Secret in the service's namespace."""

    name: str = Field(
        ..., pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253, description="The Secret's name."
    )
    key: str = Field(..., pattern=r"^[-._a-zA-Z0-9]+$", max_length=253, description="The key within the Secret.")


class HubCacheSpec(_Model):
    """Where hf:// models are cached: a node folder shared by the node's pods, or a PVC."""

    hostPath: str = Field("/var/cache/kvflock/hub", pattern=r"^/", description="The node folder (without claimName).")
    claimName: str | None = Field(None, min_length=1, description="A PVC instead of the node folder (ReadWriteMany"
                                  " to share it between nodes).")


class ModelSpec(_Model):
    """Which model the workers serve, and where each worker finds its files."""

    source: str = Field(
        "demo",
        pattern=r"^(demo|path|pvc|hostPath)$|" + HUB_SOURCE_PATTERN,
        description="demo: the bundled SmolLM2-135M-Instruct GGUF; path: a path in the worker image;"
        " pvc: a PersistentVolumeClaim mounted read-only at /models; hostPath: a node folder mounted"
        " read-only at /models; hf://org/name@revision: a Hugging Face Hub model, fetched by an init"
        " container into `hubCache` (HF_ENDPOINT in `env` names a mirror).",
    )
    path: str | None = Field(
        None,
        min_length=1,
        description="For source=path, the absolute path of the HF folder or .gguf file in the pod; for"
        " pvc and hostPath, its path relative to the volume's root (empty: the root itself).",
    )
    claimName: str | None = Field(None, min_length=1, description="The PVC's name (source=pvc).")
    hostPath: str | None = Field(None, pattern=r"^/", description="The node folder (source=hostPath).")
    servedName: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="The model name that clients put in their requests (default: the resource's name).",
    )
    hubCache: HubCacheSpec = Field(default_factory=HubCacheSpec)
    hubTokenSecretRef: SecretKeyRef | None = Field(
        None, description="The Secret key holding a Hub token, for gated or private models (source=hf://...).",
    )
    format: Literal["auto", "hf", "gguf", "dummy"] = Field(
        "auto",
        description="auto: from the path (a .gguf file or an HF folder); hf: safetensors folder; gguf: a .gguf"
        " file; dummy: random weights of the model's architecture (benchmarks).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.source != 'path' || (has(self.path) && self.path.startsWith('/'))",
                     "source=path needs an absolute path"),
                _cel("self.source != 'pvc' || has(self.claimName)", "source=pvc needs claimName"),
                _cel("self.source != 'hostPath' || has(self.hostPath)", "source=hostPath needs hostPath"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        if self.source == "path" and not (self.path or "").startswith("/"):
            raise ValueError(f"model.path must be an absolute path when model.source=path, got {self.path!r}")
        if self.source == "pvc" and not self.claimName:
            raise ValueError("model.claimName is required when model.source=pvc")
        if self.source == "hostPath" and not self.hostPath:
            raise ValueError("model.hostPath is required when model.source=hostPath")
        return self


class KVCacheSpec(_Model):
    """The paged KV cache and its offload tiers (GPU memory, then CPU memory, then disk)."""

    blockSize: Literal[1, 2, 4, 8, 16, 32, 64, 128, 256] = Field(16, description="Tokens per KV block.")
    dtype: Literal["auto", "fp8"] = Field("auto", description="auto: the model's dtype; fp8: float8_e4m3fn.")
    gpuMemoryUtilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory the worker may use (weights + KV cache)."
    )
    cpuOffloadGiB: float = Field(0, ge=0, le=4096, description="Pinned CPU memory for evicted KV blocks (0: off).")
    diskOffloadGiB: float = Field(0, ge=0, le=65536, description="Disk space for evicted KV blocks (0: off).")
    diskPath: str = Field(
        "/var/cache/kvflock/kv", pattern=r"^/",
        description="Folder of the disk KV tier: the operator mounts an emptyDir of diskOffloadGiB there.",
    )


class SpeculativeSpec(_Model):
    """Speculative decoding: draft several tokens per step and verify them in one forward pass."""

    method: Literal["ngram", "draft"] = Field(
        description="ngram: prompt lookup (drafts copied from the prompt and output; no extra model); draft: a"
        " small model with the served model's tokenizer (draftModel)."
    )
    numTokens: int = Field(4, ge=1, le=16, description="Tokens drafted per step and sequence.")
    promptLookupMin: int = Field(2, ge=1, le=16, description="ngram: shortest suffix matched.")
    promptLookupMax: int = Field(4, ge=1, le=16, description="ngram: longest suffix matched (tried first).")
    draftModel: str | None = Field(
        None, pattern=r"^/", description="draft: absolute path of the draft model (HF folder or .gguf) in the"
        " worker pod, e.g. under /models on the model's volume."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.method != 'draft' || has(self.draftModel)", "method=draft needs draftModel"),
                _cel("self.method == 'draft' || !has(self.draftModel)", "draftModel is only used by method=draft"),
                _cel("self.promptLookupMin <= self.promptLookupMax", "promptLookupMin must not exceed promptLookupMax"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check_method(self) -> SpeculativeSpec:
        if self.method == "draft" and not self.draftModel:
            raise ValueError("engine.speculative.draftModel is required when engine.speculative.method=draft")
        if self.method != "draft" and self.draftModel:
            raise ValueError("engine.speculative.draftModel is only used by engine.speculative.method=draft")
        if self.promptLookupMin > self.promptLookupMax:
            raise ValueError(f"engine.speculative.promptLookupMin ({self.promptLookupMin}) must not exceed"
                             f" engine.speculative.promptLookupMax ({self.promptLookupMax})")
        return self


class LoRASpec(_Model):
    """LoRA adapters on the served model: its presence turns them on in the engine (which rolls the
    workers once); then `spec.adapters` come and go without a restart."""

    maxLoras: int = Field(8, ge=1, le=256, description="Adapters in GPU memory at once (one engine step uses at"
                          " most this many).")
    maxLoraRank: int = Field(16, ge=1, le=128, description="The largest adapter rank served.")
    maxCpuLoras: int = Field(32, ge=1, le=4096, description="Adapters kept in CPU memory; others are read from"
                             " disk again when asked for.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.maxCpuLoras >= self.maxLoras", "maxCpuLoras must be at least maxLoras"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check_slots(self) -> LoRASpec:
        if self.maxCpuLoras < self.maxLoras:
            raise ValueError(f"engine.lora.maxCpuLoras ({self.maxCpuLoras}) must be at least"
                             f" engine.lora.maxLoras ({self.maxLoras})")
        return self


# CEL: no KV offload tier (the quantities are numbers, which CEL compares as doubles only).
_NO_OFFLOAD = "(double(self.kvCache.cpuOffloadGiB) == 0.0 && double(self.kvCache.diskOffloadGiB) == 0.0)"
# CEL: a replica's ranks (GPUs), and a replica of one rank.
_WORLD = "self.tensorParallelSize * self.pipelineParallelSize * self.contextParallelSize"
_ONE_RANK = f"{_WORLD} == 1"
# A replica is one pod, and a pod runs on one node: the most GPUs a node commonly has.
MAX_GPUS_PER_REPLICA = 8
# The same at the spec's level, and the fields it multiplies, for messages.
_SPEC_WORLD = ("self.engine.tensorParallelSize * self.engine.pipelineParallelSize"
               " * self.engine.contextParallelSize")
_WORLD_FIELDS = "engine.tensorParallelSize x engine.pipelineParallelSize x engine.contextParallelSize"


class EngineSpec(_Model):
    """The inference engine's settings, passed to every worker as its engine config file.

    Each field is one of the engine's EngineConfig fields (kvflock.worker.config), with the same
    default and bounds (tests/operator/test_engine_fields.py holds them to it): the same name in
    camelCase, or the one `ENGINE_FIELD_NAMES` gives."""

    tensorParallelSize: Literal[1, 2, 4, 8] = Field(1, description="GPUs (ranks) that split each layer.")
    pipelineParallelSize: int = Field(
        1, ge=1, le=8, description="Pipeline stages that split the model's layers (at most its layers); a replica"
        " has tensorParallelSize x pipelineParallelSize x contextParallelSize GPUs.",
    )
    contextParallelSize: int = Field(
        1, ge=1, le=8, description="GPUs that split a long prompt by sequence (ring attention), each keeping"
        " 1/contextParallelSize of every sequence's KV cache; kvCache.blockSize must be a multiple of it.",
    )
    contextParallelMinTokens: int = Field(
        2048, ge=1, le=1048576, description="With contextParallelSize > 1: prefill chunks of at least this many"
        " tokens are split over the context ranks; shorter ones run whole on each.",
    )
    expertParallel: bool = Field(
        False, description="Mixture-of-experts models with tensorParallelSize > 1: each GPU holds whole experts"
        " (numExperts / tensorParallelSize of them) instead of a share of every expert.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        "auto", description="Weights' dtype (auto: bfloat16 on a GPU, float32 on CPU)."
    )
    quantization: Literal["gptq", "awq", "int8", "int4", "fp8"] | None = Field(
        None,
        description="Quantization of the linear layers (default: as the checkpoint is). gptq / awq: require a"
        " GPTQ (4 or 8 bits) / AWQ (4 bits, gemm) checkpoint; int8 (per channel) / int4 (groups of 128):"
        " weight-only, quantize plain weights at load; fp8: e4m3 weights and per-token activations (an FP8"
        " checkpoint, or plain weights quantized at load; GPUs of CUDA capability 8.9+).",
    )
    maxModelLen: int | None = Field(
        None, ge=1, le=1048576, description="Longest context in tokens (default: the model's own)."
    )
    maxNumSeqs: int = Field(64, ge=1, le=4096, description="Sequences batched together at most.")
    maxNumBatchedTokens: int = Field(2048, ge=1, le=1048576, description="Token budget of one engine step.")
    prefixCaching: bool = Field(True, description="Reuse the KV blocks of shared prompt prefixes.")
    kvCache: KVCacheSpec = Field(default_factory=KVCacheSpec)
    speculative: SpeculativeSpec | None = Field(None, description="Speculative decoding (default: off).")
    lora: LoRASpec | None = Field(
        None, description="Serve LoRA adapters (spec.adapters) on the model (default: off); one GPU per replica only.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.maxNumBatchedTokens >= self.kvCache.blockSize",
                     "maxNumBatchedTokens must hold at least one KV block"),
                _cel(f"self.prefixCaching || {_NO_OFFLOAD}", "KV offload (kvCache.cpuOffloadGiB, kvCache.diskOffloadGiB)"
                     " needs prefixCaching"),
                _cel(f"{_ONE_RANK} || {_NO_OFFLOAD}", "KV offload (kvCache.cpuOffloadGiB,"
                     " kvCache.diskOffloadGiB) works with one GPU per replica only"
                     f" ({_WORLD_FIELDS} = 1)"),
                _cel(f"{_WORLD} <= {MAX_GPUS_PER_REPLICA}", "a replica's GPUs (tensorParallelSize x"
                     f" pipelineParallelSize x contextParallelSize) must fit one node: at most {MAX_GPUS_PER_REPLICA}",
                     ".pipelineParallelSize"),
                _cel("self.kvCache.blockSize % self.contextParallelSize == 0",
                     "kvCache.blockSize must be a multiple of contextParallelSize (each context rank keeps"
                     " blockSize / contextParallelSize tokens of every block)", ".contextParallelSize"),
                _cel(f"{_ONE_RANK} || !has(self.lora)", "LoRA adapters (lora) work with one GPU per replica only"
                     f" ({_WORLD_FIELDS} = 1)"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check_budget(self) -> EngineSpec:
        if self.maxNumBatchedTokens < self.kvCache.blockSize:
            raise ValueError(
                f"engine.maxNumBatchedTokens ({self.maxNumBatchedTokens}) must hold at least one KV block"
                f" (engine.kvCache.blockSize={self.kvCache.blockSize})"
            )
        return self

    @model_validator(mode="after")
    def _check_layout(self) -> EngineSpec:
        if self.kvCache.blockSize % self.contextParallelSize:
            raise ValueError(f"engine.contextParallelSize: {self.contextParallelSize} does not divide"
                             f" engine.kvCache.blockSize={self.kvCache.blockSize} (each context rank keeps"
                             " blockSize / contextParallelSize tokens of every block)")
        if self.layout.world_size > MAX_GPUS_PER_REPLICA:
            raise ValueError(f"engine.pipelineParallelSize: {self.layout.label} is {self.layout.world_size} GPUs per"
                             f" replica (tensorParallelSize x pipelineParallelSize x contextParallelSize); a replica"
                             f" is one pod on one node, at most {MAX_GPUS_PER_REPLICA}")
        return self

    @model_validator(mode="after")
    def _check_offload(self) -> EngineSpec:
        if not (self.kvCache.cpuOffloadGiB or self.kvCache.diskOffloadGiB):
            return self
        if not self.prefixCaching:
            raise ValueError("engine.kvCache.cpuOffloadGiB/diskOffloadGiB: KV offload needs engine.prefixCaching")
        if self.layout.world_size > 1:
            raise ValueError("engine.kvCache.cpuOffloadGiB/diskOffloadGiB: KV offload works with one GPU per"
                             f" replica only ({_WORLD_FIELDS} = 1), got {self.layout.label}")
        return self

    @model_validator(mode="after")
    def _check_lora(self) -> EngineSpec:
        if self.lora is not None and self.layout.world_size > 1:
            raise ValueError("engine.lora: LoRA adapters work with one GPU per replica only"
                             f" ({_WORLD_FIELDS} = 1), got {self.layout.label}")
        return self

    @property
    def layout(self) -> ParallelLayout:
        """The replica's ranks, as the workers lay them out."""
        return ParallelLayout(self.tensorParallelSize, self.pipelineParallelSize, self.contextParallelSize)

    def engine_config(self) -> dict[str, Any]:
        """These settings under their EngineConfig names, as a worker's engine config file holds
        them; unset ones (speculative decoding off, maxModelLen, quantization) are left out, and
        the `lora` section's presence is EngineConfig's enable_lora."""
        config = {engine_field_name(path): value for path, value in _leaves(self.model_dump()) if value is not None}
        return {**config, "enable_lora": True} if self.lora is not None else config


# EngineConfig's names (kvflock.worker.config) of the `engine` fields whose own name, in snake_case,
# is not it; every other field is its name in snake_case (maxNumSeqs: max_num_seqs).
ENGINE_FIELD_NAMES = {
    "prefixCaching": "enable_prefix_caching",
    "kvCache.blockSize": "block_size",
    "kvCache.dtype": "kv_cache_dtype",
    "kvCache.gpuMemoryUtilization": "gpu_memory_utilization",
    "kvCache.cpuOffloadGiB": "kv_offload_cpu_gib",
    "kvCache.diskOffloadGiB": "kv_offload_disk_gib",
    "kvCache.diskPath": "kv_offload_disk_path",
    "speculative.method": "speculative_method",
    "speculative.numTokens": "num_speculative_tokens",
    "speculative.promptLookupMin": "prompt_lookup_min",
    "speculative.promptLookupMax": "prompt_lookup_max",
    "speculative.draftModel": "draft_model",
    "lora.maxLoras": "max_loras",
    "lora.maxLoraRank": "max_lora_rank",
    "lora.maxCpuLoras": "max_cpu_loras",
}


def engine_field_name(path: str) -> str:
    """The EngineConfig field of an `engine` field, by its dotted path (kvCache.blockSize: block_size)."""
    return ENGINE_FIELD_NAMES.get(path) or re.sub(r"(?<!^)([A-Z])", r"_\1", path).lower()


def _leaves(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every non-object value of a nested dict."""
    leaves = []
    for key, value in values.items():
        if isinstance(value, dict):
            leaves += _leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


class ResourcesSpec(_Model):
    """What each replica asks of its node."""

    gpuResourceName: str = Field("nvidia.com/gpu", min_length=1, description="Extended resource of the GPUs.")
    gpusPerReplica: int | None = Field(
        None, ge=0, le=8,
        description="GPUs per replica: 0 runs on CPU; otherwise it must equal engine.tensorParallelSize x"
        " engine.pipelineParallelSize x engine.contextParallelSize (the default).",
    )
    cpu: str = Field("2", pattern=_QUANTITY, description="CPU request per replica.")
    memory: str = Field("8Gi", pattern=_QUANTITY, description="Memory request and limit per replica.")


class AutoscalingSpec(_Model):
    """Replica count from the workers' load, within [minReplicas, maxReplicas]."""

    enabled: bool = Field(False, description="Let the operator set replicas from the workers' metrics.")
    minReplicas: int = Field(1, ge=0, le=1000, description="Fewest replicas (0 scales to zero).")
    maxReplicas: int = Field(4, ge=1, le=1000, description="Most replicas.")
    metric: Literal["queueDepth", "kvCacheUtilization", "ttftP99"] = Field(
        "queueDepth", description="The per-replica load signal to hold at `target`."
    )
    target: float = Field(8, gt=0, description="Target value of `metric` per replica.")
    scaleUpStabilizationSeconds: int = Field(0, ge=0, le=3600, description="Window before scaling up.")
    scaleDownStabilizationSeconds: int = Field(300, ge=0, le=3600, description="Window before scaling down.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSpec:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(
                f"autoscaling.minReplicas ({self.minReplicas}) must not exceed"
                f" autoscaling.maxReplicas ({self.maxReplicas})"
            )
        return self


class PoolEngineSpec(_Model):
    """Engine settings of one pool's workers; each one unset keeps the service's `engine` value."""

    maxModelLen: int | None = Field(None, ge=1, le=1048576, description="Longest context in tokens.")
    maxNumSeqs: int | None = Field(None, ge=1, le=4096, description="Sequences batched together at most.")
    maxNumBatchedTokens: int | None = Field(None, ge=1, le=1048576, description="Token budget of one engine step.")


class PoolSpec(_Model):
    """A router pool with workers of its own: requests whose prompt length falls in
    [minPromptTokens, maxPromptTokens) go to its workers, which the operator deploys with the
    pool's resources and engine settings."""

    name: str = Field(..., pattern=_DNS_LABEL, max_length=20, description="The pool's name.")
    minPromptTokens: int = Field(0, ge=0, description="Shortest prompt (tokens) routed to this pool.")
    maxPromptTokens: int | None = Field(None, ge=1, description="Prompts this long or longer go elsewhere.")
    replicas: int | None = Field(
        None, ge=0, le=1000,
        description="This pool's workers, fixed. Unset: spec.replicas, which kubectl scale and the autoscaler set.",
    )
    resources: ResourcesSpec | None = Field(None, description="Each of this pool's workers' resources (unset: spec.resources).")
    engine: PoolEngineSpec | None = Field(None, description="Engine settings of this pool's workers (unset: spec.engine's).")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("!has(self.maxPromptTokens) || self.minPromptTokens < self.maxPromptTokens",
                     "minPromptTokens must be below maxPromptTokens"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check_range(self) -> PoolSpec:
        if self.maxPromptTokens is not None and self.minPromptTokens >= self.maxPromptTokens:
            raise ValueError(
                f"pool {self.name!r}: minPromptTokens ({self.minPromptTokens}) must be below"
                f" maxPromptTokens ({self.maxPromptTokens})"
            )
        return self


class RouterSpec(_Model):
    """The service's entry point in front of the workers."""

    policy: Literal["prefix-aware", "least-loaded", "round-robin"] = Field(
        "prefix-aware", description="How the router picks a replica for each request."
    )
    pools: list[PoolSpec] = Field(default_factory=list, max_length=8, description="Pools by prompt length.")
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Type of the entry Service."
    )
    port: int = Field(80, ge=1, le=65535, description="Port of the entry Service.")
    holdTimeoutSeconds: int = Field(
        60, ge=0, le=3600,
        description="How long the router holds a request while no replica can take it (scale from zero,"
        " start-up) before it answers 503; 0 answers at once.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.pools.all(p, self.pools.exists_one(q, q.name == p.name))", "pool names must be unique"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check_unique_pools(self) -> RouterSpec:
        names = [pool.name for pool in self.pools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"router.pools names must be unique, repeated: {duplicates}")
        return self


class Toleration(_Model):
    """A Kubernetes toleration."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = Field(None, ge=0)


class SchedulingSpec(_Model):
    """Where worker pods may run."""

    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Node labels a worker's node must have.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the workers tolerate.")
    affinity: dict[str, Any] | None = Field(None, description="A Kubernetes Affinity, as in a Pod spec.")
    priorityClassName: str | None = Field(None, min_length=1, description="PriorityClass of the workers.")


class EnvVar(_Model):
    """An environment variable of the worker container."""

    name: str = Field(..., pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = None
    valueFrom: dict[str, Any] | None = Field(None, description="A Kubernetes EnvVarSource.")


class ProbesSpec(_Model):
    """Timing of the workers' probes (startup and readiness on /ready; liveness on /health)."""

    periodSeconds: int = Field(5, ge=1, le=300, description="Seconds between readiness checks.")
    timeoutSeconds: int = Field(2, ge=1, le=60, description="Seconds before a probe counts as failed.")
    failureThreshold: int = Field(3, ge=1, le=100, description="Failed checks before not-ready or restart.")
    startupSeconds: int = Field(
        900, ge=10, le=7200, description="Time allowed to load the weights before liveness applies."
    )


class AuthSpec(_Model):
    """Access control of the service's endpoint."""

    apiKeySecretRef: SecretKeyRef = Field(
        ...,
        description="The Secret key that holds the API keys clients must send as `Authorization: Bearer <key>`"
        " (one per line). The workers read it from a mounted file, so the keys never appear in a Pod spec.",
    )


class EndpointPickerSpec(_Model):
    """The Gateway API Inference Extension's endpoint picker (EPP) that serves this pool: the
    InferencePool's `endpointPickerRef`. kvflock does not run the picker; the extension's
    `inferencepool` chart does, with the flags the operator writes to the `<name>-epp` ConfigMap."""

    serviceName: str | None = Field(
        None, pattern=_DNS_LABEL, max_length=63, description="The picker's Service (default: <name>-epp).",
    )
    port: int = Field(9002, ge=1, le=65535, description="The picker's ext-proc port on that Service.")
    failureMode: Literal["FailOpen", "FailClose"] = Field(
        "FailClose", description="What the gateway does while the picker does not answer.",
    )


class InferencePoolSpec(_Model):
    """Serve the workers through a Gateway API Inference Extension gateway: the operator renders an
    InferencePool (inference.networking.k8s.io/v1) selecting this service's workers. The gateway's
    proxy then calls the workers directly; with `auth`, they accept the users' API keys too."""

    endpointPicker: EndpointPickerSpec = Field(default_factory=EndpointPickerSpec)


# Model names as OpenAI's and Hugging Face's look (ft:gpt-4o:org:id, org/name-v2): no spaces, no
# leading or trailing punctuation, so a name reads the same in a request, a log line and a label.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9._:/]*[A-Za-z0-9])?$"


class AdapterSource(_Model):
    """Where the workers find a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""

    path: str = Field(
        ..., pattern=r"^/", max_length=4096,
        description="Its absolute path in the worker pods: in the image, or on a volume they mount (with"
        " model.source=pvc or hostPath, under /models).",
    )


class AdapterSpec(_Model):
    """A LoRA adapter served beside the model: requests whose `model` is its name use it."""

    name: str = Field(
        ..., pattern=ADAPTER_NAME_PATTERN, max_length=256,
        description="The model name clients send for this adapter (letters, digits, '-', '.', '_', ':', '/').",
    )
    source: AdapterSource


class InferenceServiceSpec(_Model):
    """A model served by replicas of the kvflock engine behind one OpenAI-compatible endpoint."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    image: str = Field(DEFAULT_IMAGE, min_length=1, description="Worker image (its entrypoint: kvflock).")
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent")
    replicas: int = Field(1, ge=0, le=1000, description="Worker replicas (the scale subresource).")
    engine: EngineSpec = Field(default_factory=EngineSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Extra worker environment.")
    probes: ProbesSpec = Field(default_factory=ProbesSpec)
    auth: AuthSpec | None = Field(None, description="API keys required of clients (absent: no authentication).")
    inferencePool: InferencePoolSpec | None = Field(
        None, description="An InferencePool for a Gateway API Inference Extension gateway (absent: none).",
    )
    drainTimeoutSeconds: int = Field(
        60, ge=0, le=3600,
        description="How long a replica being removed may finish its requests in flight.",
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list, max_length=256,
        description="LoRA adapters served beside the model (needs engine.lora). Adding or removing one loads"
        " or unloads it on the running workers: no pod restarts.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.resources.gpusPerReplica) || self.resources.gpusPerReplica == 0"
                    f" || self.resources.gpusPerReplica == {_SPEC_WORLD}",
                    f"resources.gpusPerReplica must be 0 (CPU) or equal {_WORLD_FIELDS}",
                ),
                _cel(
                    "!self.autoscaling.enabled || (self.replicas >= self.autoscaling.minReplicas"
                    " && self.replicas <= self.autoscaling.maxReplicas)",
                    "with autoscaling enabled, replicas must lie within [minReplicas, maxReplicas]",
                ),
                _cel(
                    "self.router.pools.all(p, !has(p.resources) || !has(p.resources.gpusPerReplica)"
                    f" || p.resources.gpusPerReplica == 0 || p.resources.gpusPerReplica == {_SPEC_WORLD})",
                    f"a pool's resources.gpusPerReplica must be 0 (CPU) or equal {_WORLD_FIELDS}",
                ),
                _cel(
                    "self.router.pools.all(p, !has(p.engine) || !has(p.engine.maxNumBatchedTokens)"
                    " || p.engine.maxNumBatchedTokens >= self.engine.kvCache.blockSize)",
                    "a pool's engine.maxNumBatchedTokens must hold at least one KV block",
                ),
                _cel(f"size(self.adapters) == 0 || {_SPEC_WORLD} == 1",
                     f"adapters work with one GPU per replica only ({_WORLD_FIELDS} = 1)", ".adapters"),
                _cel("size(self.adapters) == 0 || has(self.engine.lora)",
                     "adapters need engine.lora (LoRA on in the engine)", ".adapters"),
                _cel("self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
                     "adapter names must be unique", ".adapters"),
                _cel("!has(self.model.servedName) || self.adapters.all(a, a.name != self.model.servedName)",
                     "an adapter's name must differ from model.servedName", ".adapters"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> InferenceServiceSpec:
        gpus, world = self.resources.gpusPerReplica, self.engine.layout.world_size
        if gpus not in (None, 0, world):
            raise ValueError(f"resources.gpusPerReplica ({gpus}) must be 0 (CPU) or equal {_WORLD_FIELDS} ({world})")
        scaling = self.autoscaling
        if scaling.enabled and not scaling.minReplicas <= self.replicas <= scaling.maxReplicas:
            raise ValueError(
                f"with autoscaling enabled, replicas ({self.replicas}) must lie within"
                f" [{scaling.minReplicas}, {scaling.maxReplicas}]"
            )
        for pool in self.router.pools:
            self.pool_engine(pool)
            pool_gpus = pool.resources.gpusPerReplica if pool.resources else None
            if pool_gpus not in (None, 0, world):
                raise ValueError(
                    f"router.pools[{pool.name}].resources.gpusPerReplica ({pool_gpus}) must be 0 (CPU) or equal"
                    f" {_WORLD_FIELDS} ({world})"
                )
        return self

    @model_validator(mode="after")
    def _check_adapters(self) -> InferenceServiceSpec:
        if not self.adapters:
            return self
        if self.engine.layout.world_size > 1:
            raise ValueError("adapters: LoRA adapters work with one GPU per replica only"
                             f" ({_WORLD_FIELDS} = 1), got {self.engine.layout.label}")
        if self.engine.lora is None:
            raise ValueError("adapters: set engine.lora (e.g. `lora: {}`) to turn LoRA on in the engine")
        names = [a.name for a in self.adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"adapters: names must be unique, repeated: {duplicates}")
        if self.model.servedName in names:
            raise ValueError(f"adapters: {self.model.servedName!r} is model.servedName; name the adapter otherwise")
        return self

    def pool_engine(self, pool: PoolSpec) -> EngineSpec:
        """The engine settings of a pool's workers: the service's, with the pool's overrides."""
        overrides = pool.engine.model_dump(exclude_none=True) if pool.engine else {}
        try:
            return EngineSpec.model_validate({**self.engine.model_dump(), **overrides})
        except ValidationError as exc:
            problem = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ValueError(f"router.pools[{pool.name}].engine: {problem}") from None

    @property
    def gpus(self) -> int:
        """GPUs each replica requests."""
        gpus = self.resources.gpusPerReplica
        return self.engine.layout.world_size if gpus is None else gpus


class Condition(_Model):
    """A condition in the Kubernetes convention."""

    type: Literal["Ready", "Progressing", "Degraded"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(..., pattern=r"^[A-Za-z]([A-Za-z0-9_]*[A-Za-z0-9])?$")
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class WorkerStatus(_Model):
    """One replica as the operator last saw it."""

    name: str
    phase: str = Field("Pending", description="The pod's phase.")
    ready: bool = False
    updated: bool = Field(True, description="Runs the current spec (false while a rollout replaces it).")
    draining: bool = False
    drained: bool | None = Field(None, description="The worker reported its drain finished (GET /admin/drain).")
    runningRequests: int | None = Field(None, description="Requests in flight, from the worker's /metrics.")
    waitingRequests: int | None = Field(None, description="Requests queued, from the worker's /metrics.")
    kvCacheUsage: float | None = Field(None, description="Share of KV blocks in use, from /metrics.")
    cachedBlocks: int | None = Field(None, description="KV blocks holding a known prefix, from /metrics.")
    probeTime: str | None = Field(None, description="When /ready and /metrics were last read.")
    probeError: str | None = Field(None, description="Why the last read failed, if it did.")
    adapters: dict[str, str] | None = Field(
        None, description="The LoRA adapters it serves, each with its folder, from its /metrics (absent: not read).",
    )


class AdapterStatus(_Model):
    """One adapter of spec.adapters across the workers."""

    name: str
    replicas: int = Field(0, description="Ready workers that serve it.")
    error: str | None = Field(None, description="Why the last load failed (the worker's message), if it did.")


class AutoscalerStatus(_Model):
    """The autoscaler's last decision."""

    desiredReplicas: int = Field(..., description="The replicas it asked for.")
    recommendedReplicas: int = Field(..., description="What the load alone asked for, before stabilization.")
    metric: str = Field(..., description="The load signal it held at its target.")
    value: float | None = Field(None, description="The signal's value per replica (absent: no worker reported it).")
    heldRequests: int = Field(0, description="Requests the router held while no replica was ready.")
    reason: str = Field("", description="Why it decided as it did.")
    time: str | None = Field(None, description="When it decided.")
    lastScaleTime: str | None = Field(None, description="When it last changed the replicas.")


class InferenceServiceStatus(_Model):
    """What the operator observed and did."""

    replicas: int = Field(0, description="Worker pods that exist and are not being removed.")
    readyReplicas: int = Field(0, description="Of those, the ones ready to serve.")
    updatedReplicas: int = Field(0, description="Of those, the ones that run the current spec.")
    selector: str = Field("", description="Label selector of the workers (for the scale subresource).")
    url: str | None = Field(None, description="The OpenAI-compatible endpoint.")
    model: str | None = Field(None, description="The served model name.")
    layout: str | None = Field(None, description="How each replica splits the model over its GPUs, e.g. TP2xPP2.")
    specHash: str | None = Field(None, description="Hash of the current worker template.")
    observedGeneration: int | None = None
    workers: list[WorkerStatus] = Field(default_factory=list)
    autoscaler: AutoscalerStatus | None = Field(None, description="The autoscaler's last decision (when enabled).")
    adapters: list[AdapterStatus] = Field(default_factory=list, description="Each of spec.adapters: who serves it.")
    conditions: list[Condition] = Field(default_factory=list)


def check_name(name: str) -> None:
    """Reject a resource name whose children's names would not be valid DNS labels."""
    if len(name) > MAX_NAME_LENGTH or not re.fullmatch(_DNS_LABEL, name):
        raise ValueError(
            f"metadata.name {name!r} must be a DNS label of at most {MAX_NAME_LENGTH} characters"
            " (lowercase letters, digits, '-'; starting with a letter), as the worker pods and"
            " Services are named after it"
        )


def check_adapter_names(name: str, spec: InferenceServiceSpec) -> None:
    """Reject an adapter named as the model is served by default (the resource's name), which
    the CRD's rules cannot see from inside spec."""
    if spec.model.servedName is None and name in {a.name for a in spec.adapters}:
        raise ValueError(f"adapters: {name!r} is the served model's name (metadata.name); name the adapter otherwise")


def format_errors(error: ValidationError) -> str:
    """A one-line summary of a spec's validation errors, each naming its field."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{where}: {message}" if where else f"spec: {message}")
    return "; ".join(parts)

