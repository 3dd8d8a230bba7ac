"""Decode steps replayed from CUDA graphs give the tokens of eager steps; GPU memory sizing
from gpu_memory_utilization stays within its share."""

import pytest
import torch

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.cuda_graphs import capture_batch_sizes
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM


def test_capture_batch_sizes_cover_every_batch_up_to_the_limit():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_batch_sizes(1000)
    assert sizes[-1] == 256 and all(b - a <= 8 for a, b in zip(sizes, sizes[1:]))


def test_cpu_engine_captures_no_graphs(tiny_engine):
    assert tiny_engine().runner.decode_graphs is None


def _greedy_tokens(engine: LLMEngine, prompts: list[list[int]],
                   params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in LLM.from_engine(engine).generate(prompts, params)]


@pytest.mark.gpu
def test_graph_decoding_matches_eager_decoding(dummy_model):
    """Five sequences of different lengths finish at different steps, so decode batches of 5,
    4, ... 1 replay padded graphs (8, 4, 4, 2, 1). float32 keeps the two paths' different
    split-K orders (the graphs' block tables are max_model_len wide) far below any logit gap."""
    base = dict(model=dummy_model, load_format="dummy", dtype="float32", device="cuda", max_model_len=256,
                max_num_seqs=8, num_kv_blocks=64, seed=0)
    graphs = LLMEngine(EngineConfig(**base))
    eager = LLMEngine(EngineConfig(**base, enforce_eager=True), loaded=graphs.loaded)
    assert graphs.runner.decode_graphs is not None and eager.runner.decode_graphs is None
    prompts = [list(range(3 + 7 * i, 10 + 13 * i)) for i in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 6 * i, ignore_eos=True) for i in range(5)]
    assert _greedy_tokens(graphs, prompts, params) == _greedy_tokens(eager, prompts, params)


@pytest.mark.gpu
def test_verify_steps_replayed_from_graphs_keep_greedy_output(dummy_model):
    """A model drafting for itself proposes k tokens for every sequence each step, so verify
    steps are uniform and replay the verify graphs; the output stays the plain eager one."""
    base = dict(model=dummy_model, load_format="dummy", dtype="float32", device="cuda", max_model_len=256,
                max_num_seqs=8, num_kv_blocks=64, seed=0)
    eager = LLMEngine(EngineConfig(**base, enforce_eager=True))
    spec = LLMEngine(EngineConfig(**base, speculative_method="draft", draft_model=dummy_model,
                                  num_speculative_tokens=3), loaded=eager.loaded, draft=eager.loaded)
    graphs = spec.runner.verify_graphs
    assert graphs is not None and graphs.tokens_per_seq == 4
    replays = []
    run = graphs.run
    graphs.run = lambda *args: replays.append(1) or run(*args)
    prompts = [list(range(3 + 7 * i, 10 + 13 * i)) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    assert _greedy_tokens(spec, prompts, params) == _greedy_tokens(eager, prompts, params)
    assert replays, "no verify step replayed a graph"


@pytest.mark.gpu
def test_kv_cache_fills_what_gpu_memory_utilization_leaves(dummy_model):
    free, total = torch.cuda.mem_get_info()
    share = (total - free) / total + 0.05  # 5% of the GPU above what is in use now
    engine = LLMEngine(EngineConfig(model=dummy_model, load_format="dummy", device="cuda", max_model_len=256,
                                    max_num_seqs=2048, gpu_memory_utilization=share))
    used = total - torch.cuda.mem_get_info()[0]
    assert engine.kv_manager.pool.num_blocks > 1000
    assert used <= share * total
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLMEngine(EngineConfig(model=dummy_model, load_format="dummy", device="cuda", max_model_len=256,
                               gpu_memory_utilization=0.001), loaded=engine.loaded)


@pytest.mark.gpu
def test_cuda_weights_are_stored_input_major_and_read_the_same(dummy_model):
    engine = LLMEngine(EngineConfig(model=dummy_model, load_format="dummy", dtype="float32", device="cuda",
                                    max_model_len=128, num_kv_blocks=16, enforce_eager=True))
    model = engine.loaded.model
    layer = model.model.layers[0]
    for weight in (layer.self_attn.o_proj.weight, layer.mlp.gate_proj.weight, layer.mlp.down_proj.weight,
                   model.lm_head.weight):
        assert weight.stride(0) == 1, "stored [in, out]"
    assert layer.self_attn.q_proj.weight.is_contiguous()
    x = torch.randn(3, model.config.hidden_size, device="cuda")
    torch.testing.assert_close(model.lm_head(x), x @ model.lm_head.weight.contiguous().t())
