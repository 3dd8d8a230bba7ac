"""Fixtures of the GPU tests of tensor and pipeline parallelism."""

import pytest
import torch


@pytest.fixture
def small_llama(tmp_path):
    """A random Llama with head_dim 32 (the Triton kernels need at least 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.25)
    model.save_pretrained(tmp_path)
    return tmp_path
