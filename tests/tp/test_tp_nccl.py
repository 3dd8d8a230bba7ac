"""The GPU path of tensor parallelism on one GPU: a replica of one rank whose layers still
all-reduce, gather and receive their batch through NCCL and gloo groups (no partner to talk
to), generating exactly what the single-process path generates."""

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


@pytest.mark.gpu
def test_nccl_group_of_one_rank_generates_what_one_process_does(small_llama):
    import torch.distributed as dist

    from kvflock.worker.attention import select_attention_backend
    from kvflock.worker.config import EngineConfig, SamplingParams
    from kvflock.worker.engine import LLMEngine
    from kvflock.worker.llm import LLM
    from kvflock.worker.tp import ReplicaRunner, load_replica

    config = EngineConfig(model=str(small_llama), device="cuda", dtype="float32", max_model_len=256,
                          max_num_batched_tokens=16)
    prompts = [[(7 * i + j) % 256 for j in range(n)] for i, n in enumerate((1, 5, 17, 40))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    single = [o.outputs[0].token_ids for o in LLM.from_engine(LLMEngine(config)).generate(prompts, params)]
    loaded = load_replica(config, select_attention_backend(torch.device("cuda")))
    try:
        engine = LLMEngine(config, loaded=loaded)
        assert isinstance(engine.runner, ReplicaRunner)
        assert isinstance(loaded.model.group.device_pg, dist.ProcessGroupNCCL)
        outputs = LLM.from_engine(engine).generate(prompts, params)
    finally:
        loaded.replica.shutdown()

    assert [o.outputs[0].token_ids for o in outputs] == single
    assert all(len(set(ids)) > 1 for ids in single), "degenerate reference"
