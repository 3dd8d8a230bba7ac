"""The MoE part of a model's config follows transformers' rules: which layers have experts
(decoder_sparse_step, mlp_only_layers), whether the top-k weights are renormalized, the shared
expert; and a quantized MoE model is refused with an error naming the field."""

import pytest

from kvflock.worker.attention import TorchAttentionBackend
from kvflock.worker.config import EngineConfig, ModelConfig
from kvflock.worker.model.loader import load

QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
}


def test_qwen_moe_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    cfg = ModelConfig.from_hf({**QWEN2_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert cfg.moe is not None
    assert cfg.moe.sparse_layers == (1, 5)  # (i + 1) % 2 == 0, less layer 3
    assert cfg.moe.shared_intermediate_size == 24
    assert not cfg.moe.norm_topk_prob
    assert cfg.qkv_bias  # Qwen2-MoE has q/k/v biases, as Qwen2


def test_qwen3_moe_has_no_shared_expert_and_normalizes_its_heads():
    arch = {"architectures": ["Qwen3MoeForCausalLM"], "norm_topk_prob": True}
    cfg = ModelConfig.from_hf({**QWEN2_MOE, **arch})
    assert cfg.moe is not None and cfg.moe.shared_intermediate_size == 0 and cfg.moe.norm_topk_prob
    assert cfg.moe.sparse_layers == tuple(range(6))
    assert cfg.qk_norm and not cfg.qkv_bias


def test_transformers_5_num_local_experts_name_counts_as_num_experts():
    hf = {k: v for k, v in QWEN2_MOE.items() if k != "num_experts"} | {"num_local_experts": 4}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.moe is not None and cfg.moe.num_experts == 4


def test_mixtral_experts_are_in_every_layer_with_the_models_intermediate_size_and_renormalized():
    hf = {**QWEN2_MOE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8}
    del hf["num_experts"]
    cfg = ModelConfig.from_hf(hf)
    assert cfg.moe is not None
    assert (cfg.moe.num_experts, cfg.moe.intermediate_size, cfg.moe.norm_topk_prob) == (8, 64, True)
    assert cfg.moe.sparse_layers == tuple(range(6))


def test_dense_models_have_no_moe():
    assert ModelConfig.from_hf({**QWEN2_MOE, "architectures": ["Qwen2ForCausalLM"]}).moe is None


def test_quantizing_an_moe_model_is_refused_naming_the_field(tiny_models):
    config = EngineConfig(model=str(tiny_models["mixtral"]), quantization="int8", device="cpu")
    with pytest.raises(ValueError, match="quantization: .* not supported for mixture-of-experts"):
        load(config, TorchAttentionBackend())
