"""Each rank builds and loads only its slice of the model, without starting any process:
checkpoint slices read by name, KV heads replicated when ranks outnumber them, sizes that
cannot be split refused naming the field, and one rank meaning no process group at all."""

import pytest
import torch
from safetensors.torch import load_file

from kvflock.worker.attention import TorchAttentionBackend
from kvflock.worker.config import EngineConfig
from kvflock.worker.llm import LLM
from kvflock.worker.model.loader import load
from kvflock.worker.model.parallel import SINGLE_RANK, TPGroup
from kvflock.worker.runner import ModelRunner


def rank_model(path, rank: int, world: int) -> torch.nn.Module:
    """Rank `rank`'s shard as its process would load it (no collectives happen while loading)."""
    config = EngineConfig(model=str(path), dtype="float64", device="cpu", tensor_parallel_size=world)
    return load(config, TorchAttentionBackend(), TPGroup(rank, world)).model


@pytest.mark.parametrize("rank", range(4))
def test_each_rank_loads_its_slice_of_every_weight(tiny_models, rank):
    full = load_file(tiny_models["llama"] / "model.safetensors")
    shard = rank_model(tiny_models["llama"], rank, 4).state_dict()
    layer = "model.layers.1"
    head_dim = 8
    kv_head = rank // 2  # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 share KV head 0

    def holds(name: str, start: int, size: int, dim: int = 0) -> bool:
        return torch.equal(shard[name], full[name].narrow(dim, start, size))

    assert holds(f"{layer}.self_attn.q_proj.weight", rank * 16, 16)  # 2 of 8 query heads
    assert holds(f"{layer}.self_attn.k_proj.weight", kv_head * head_dim, head_dim)
    assert holds(f"{layer}.self_attn.v_proj.weight", kv_head * head_dim, head_dim)
    assert holds(f"{layer}.self_attn.o_proj.weight", rank * 16, 16, dim=1)
    assert holds(f"{layer}.mlp.up_proj.weight", rank * 32, 32)
    assert holds(f"{layer}.mlp.down_proj.weight", rank * 32, 32, dim=1)
    assert holds("model.embed_tokens.weight", rank * 64, 64)
    assert holds("lm_head.weight", rank * 64, 64)
    assert holds(f"{layer}.input_layernorm.weight", 0, 64)


def test_safetensors_are_read_slice_by_slice_never_whole(tiny_models, monkeypatch):
    """A rank reads exactly its parameters' elements from the file, through get_slice."""
    import safetensors

    read = []
    real_open = safetensors.safe_open

    class CountingFile:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, name):
            raise AssertionError(f"{name} was read whole")

        def get_slice(self, name):
            tensor = self.file.get_slice(name)
            file_read = read

            class Slice:
                def get_shape(self):
                    return tensor.get_shape()

                def __getitem__(self, index):
                    part = tensor[index]
                    file_read.append(part.numel())
                    return part

            return Slice()

    monkeypatch.setattr(safetensors, "safe_open", CountingFile)
    model = rank_model(tiny_models["qwen2"], 1, 4)

    assert sum(read) == sum(p.numel() for p in model.parameters())


def test_a_vocabulary_that_ranks_cannot_split_evenly_is_padded_with_zero_rows(tmp_path):
    """256 tokens over 3 ranks: 86 rows each; the last rank holds 84 and two rows of zeros."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    full = load_file(tmp_path / "model.safetensors")
    shard = rank_model(tmp_path, 2, 3).state_dict()

    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert shard[name].shape == (86, 48)
        assert torch.equal(shard[name][:84], full[name][172:].double())
        assert not shard[name][84:].any()


@pytest.mark.parametrize("tp,field_message", [
    (3, "tensor_parallel_size: 3 does not divide the model's num_heads=8"),
    (16, "tensor_parallel_size: 16 does not divide the model's num_heads=8"),
])
def test_a_size_that_cannot_split_the_heads_is_refused_naming_the_field(tiny_models, tp, field_message):
    with pytest.raises(ValueError, match=field_message):
        LLM(str(tiny_models["llama"]), tensor_parallel_size=tp)


def test_tensor_parallel_size_below_one_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model="demo", tensor_parallel_size=0)


def test_one_rank_needs_no_process_group(tiny_llama, tiny_engine):
    engine = tiny_engine()
    assert engine.loaded.replica is None
    assert engine.loaded.model.group is SINGLE_RANK
    assert type(engine.runner) is ModelRunner
