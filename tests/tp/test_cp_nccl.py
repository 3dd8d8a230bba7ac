"""The GPU path of context parallelism on one GPU: a replica of one rank that still runs every
step the context-parallel way (chunks split, ring attention, partials merged through NCCL
all-reduces in a group of one), generating exactly what the single-process path generates."""

import pytest
import torch


@pytest.mark.gpu
def test_nccl_context_parallel_group_of_one_generates_what_one_process_does(small_llama):
    import torch.distributed as dist

    from kvflock.worker.attention import select_attention_backend
    from kvflock.worker.config import EngineConfig, SamplingParams
    from kvflock.worker.engine import LLMEngine
    from kvflock.worker.llm import LLM
    from kvflock.worker.tp import load_replica

    config = EngineConfig(model=str(small_llama), device="cuda", dtype="float32", max_model_len=256,
                          max_num_batched_tokens=16, context_parallel_min_tokens=4)
    prompts = [[(7 * i + j) % 256 for j in range(n)] for i, n in enumerate((1, 5, 17, 40))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    single = [o.outputs[0].token_ids for o in LLM.from_engine(LLMEngine(config)).generate(prompts, params)]
    loaded = load_replica(config, select_attention_backend(torch.device("cuda")), context_parallel=True)
    try:
        engine = LLMEngine(config, loaded=loaded)
        assert engine.runner.stage.context is not None
        assert isinstance(engine.runner.stage.context.group.pg, dist.ProcessGroupNCCL)
        outputs = LLM.from_engine(engine).generate(prompts, params)
    finally:
        loaded.replica.shutdown()

    assert [o.outputs[0].token_ids for o in outputs] == single
    assert all(len(set(ids)) > 1 for ids in single), "degenerate reference"
