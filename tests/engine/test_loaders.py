"""Loaders: GGUF in F32/F16/Q8_0/Q4_0/Q4_1 (dequantized, Q/K permutation undone; Qwen3-MoE's
stacked experts split), sharded
safetensors, dummy weights; and clear errors for missing or corrupt files."""

import io
import json
import shutil
import sys

import pytest
import torch

from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM
from tests.gguf_writer import write_llama_gguf

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Worst-case absolute weight error of each format relative to the tensor's largest value.
QUANT_TOLERANCE = {"F16": 1e-3, "Q8_0": 0.01, "Q4_1": 0.1, "Q4_0": 0.15}


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory):
    """A tiny Llama without rope scaling (GGUF files carry Llama 3 scaling differently)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.25)
    folder = tmp_path_factory.mktemp("plain-llama")
    model.save_pretrained(folder)
    return model, folder


def test_f32_gguf_generates_exactly_as_the_safetensors_checkpoint(plain_llama, tmp_path):
    model, folder = plain_llama
    write_llama_gguf(model.state_dict(), model.config, tmp_path / "m.gguf", "F32")
    from_hf = LLM(str(folder), max_model_len=64).generate(PROMPTS, GREEDY)
    from_gguf = LLM(str(tmp_path / "m.gguf"), max_model_len=64).generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in from_gguf] == [o.outputs[0].token_ids for o in from_hf]


def test_qwen3_moe_gguf_generates_exactly_as_the_safetensors_checkpoint(tiny_models, tmp_path):
    """llama.cpp's qwen3moe: experts stacked per projection, router, q/k norms, no Q/K permutation."""
    from transformers import AutoConfig

    from kvflock.worker.model.loader import read_safetensors

    folder = tiny_models["qwen3_moe"]
    write_llama_gguf(dict(read_safetensors(folder)), AutoConfig.from_pretrained(folder), tmp_path / "m.gguf", "F32",
                     arch="qwen3moe")
    from_hf = LLM(str(folder), dtype="float32", max_model_len=64).generate(PROMPTS, GREEDY)
    from_gguf = LLM(str(tmp_path / "m.gguf"), dtype="float32", max_model_len=64).generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in from_gguf] == [o.outputs[0].token_ids for o in from_hf]


@pytest.mark.parametrize("qtype", sorted(QUANT_TOLERANCE))
def test_quantized_gguf_dequantizes_close_to_the_original_weights(plain_llama, tmp_path, qtype):
    model, _ = plain_llama
    write_llama_gguf(model.state_dict(), model.config, tmp_path / "m.gguf", qtype)
    loaded = LLM(str(tmp_path), max_model_len=64).engine.loaded.model.state_dict()
    for name, ref in model.state_dict().items():
        err = (loaded[name].float() - ref).abs().max() / ref.abs().max()
        assert err < QUANT_TOLERANCE[qtype], f"{name}: relative error {err:.4f}"


def test_sharded_safetensors_load_like_a_single_file(plain_llama, tmp_path):
    model, folder = plain_llama
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = LLM(str(tmp_path), max_model_len=64).generate(PROMPTS, GREEDY)
    single = LLM(str(folder), max_model_len=64).generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in sharded] == [o.outputs[0].token_ids for o in single]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_shows_each_shards_progress_on_a_terminal_only(plain_llama, tmp_path, monkeypatch):
    model, _ = plain_llama
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    LLM(str(tmp_path), max_model_len=64)
    finished = [line.rpartition("\r")[2] for line in terminal.getvalue().splitlines() if "loading " in line]
    assert finished == [
        f"loading {name} (shard {i}/{len(shards)}): {n}/{n} tensors\033[K"
        for i, name in enumerate(shards, 1) for n in [list(weight_map.values()).count(name)]]
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    LLM(str(tmp_path), max_model_len=64)
    assert "loading " not in plain.getvalue()


def test_dummy_weights_run_any_config(plain_llama):
    _, folder = plain_llama
    llm = LLM(str(folder), load_format="dummy", max_model_len=64)
    [out] = llm.generate([PROMPTS[0]], GREEDY)
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


def test_unknown_model_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="model: .*does not exist"):
        LLM(str(tmp_path / "nowhere"))


def test_corrupt_gguf_is_a_value_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ValueError, match="broken.gguf"):
        LLM(str(bad))


def test_truncated_safetensors_is_a_value_error_naming_the_file(plain_llama, tmp_path):
    _, folder = plain_llama
    shutil.copytree(folder, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(tmp_path / "m"), max_model_len=64)


def test_unsupported_architecture_is_named(plain_llama, tmp_path):
    _, folder = plain_llama
    shutil.copytree(folder, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(config.read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel"))
    with pytest.raises(ValueError, match="architectures"):
        LLM(str(tmp_path / "m"))


def test_a_gguf_tokenizer_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """A restarted worker reads the converted tokenizer back instead of converting the GGUF
    vocabulary again; the copy tokenizes and templates exactly like the conversion."""
    from kvflock.worker.model.source import resolve_model
    from kvflock.worker.model.tokenizer import load_tokenizer, tokenizer_cache_dir

    monkeypatch.setenv("KVFLOCK_CACHE_DIR", str(tmp_path))
    source = resolve_model("demo")
    converted = load_tokenizer(source)
    [entry] = list(tokenizer_cache_dir().iterdir())
    assert (entry / "tokenizer_config.json").exists()
    cached = load_tokenizer(source)
    text = "Hello wörld, 2 + 2 = 4!"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert cached.encode(text) == converted.encode(text)
    assert cached.apply_chat_template(chat, add_generation_prompt=True) == converted.apply_chat_template(
        chat, add_generation_prompt=True)
    assert cached.eos_token_id == converted.eos_token_id
    assert list(tokenizer_cache_dir().iterdir()) == [entry]
