"""Fixtures shared by the engine tests."""

from pathlib import Path

import pytest
import torch

from tests.tiny_models import VOCAB


@pytest.fixture(scope="session")
def llama128(tmp_path_factory) -> Path:
    """A tiny random Llama whose projections have 128 or 256 input features: int4 in groups
    of 128 applies as on real models."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("llama128") / "plain"
    model.save_pretrained(path)
    (path / "special_tokens_map.json").write_text("{}")  # stands for the tokenizer files to be copied
    return path
