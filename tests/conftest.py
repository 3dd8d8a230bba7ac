"""Shared test fixtures: the SmolLM2 demo model loaded once per session, and tiny random
Llama-family checkpoints written by transformers."""

import json
import os
from pathlib import Path

import pytest
import torch

# `triton.jit` decides between compiling and interpreting when a kernel is defined, so the
# interpreter is chosen here, before any test imports a kernel module. Without CUDA no compiled
# Triton kernel can run in this process, so no other test's path changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The processes the tests start (`python -m kvflock.cli`, `python -c`) run in the repository
# root, which Python would otherwise put first on their sys.path (see tests/test_install.py).
os.environ["PYTHONSAFEPATH"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The demo model's weights and tokenizer, read once and shared by every engine in the session."""
    from kvflock.worker.attention import TorchAttentionBackend
    from kvflock.worker.config import EngineConfig
    from kvflock.worker.model.loader import load

    return load(EngineConfig(model="demo", device="cpu", dtype="float32"), TorchAttentionBackend())


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own reading of the same GGUF file: the reference for greedy outputs."""
    from transformers import AutoModelForCausalLM

    from kvflock.shared.model_files import demo_model_path

    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoints saved by transformers, one per architecture family."""
    from tests.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    """The tiny random Llama, loaded once (float32) for engines with different limits."""
    from kvflock.worker.attention import TorchAttentionBackend
    from kvflock.worker.config import EngineConfig
    from kvflock.worker.model.loader import load

    return load(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu"), TorchAttentionBackend())


@pytest.fixture
def tiny_engine(tiny_llama):
    """Build an engine over the tiny Llama with the given EngineConfig overrides."""
    from kvflock.worker.config import EngineConfig
    from kvflock.worker.engine import LLMEngine

    def make(**overrides):
        return LLMEngine(EngineConfig(model=str(tiny_llama.source.path), **overrides), loaded=tiny_llama)

    return make


@pytest.fixture
def dummy_model(tmp_path):
    """A small Llama the Triton kernels accept (head_dim 64), for load_format="dummy"."""
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)
