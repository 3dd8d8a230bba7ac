"""The GPU path of pipeline parallelism: two stages on two GPUs pass activations and logits over
NCCL point-to-point and generate exactly what one process does (skipped below two GPUs; one GPU
runs the replica path at world size 1 in test_tp_nccl.py)."""

import pytest
import torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_stages_over_nccl_generate_what_one_process_does(small_llama):
    import torch.distributed as dist

    from kvflock.worker.config import SamplingParams
    from kvflock.worker.llm import LLM

    settings = dict(device="cuda", dtype="float32", max_model_len=256, max_num_batched_tokens=16)
    prompts = [[(7 * i + j) % 256 for j in range(n)] for i, n in enumerate((1, 5, 17, 40))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    single = [o.outputs[0].token_ids for o in LLM(str(small_llama), **settings).generate(prompts, params)]
    llm = LLM(str(small_llama), pipeline_parallel_size=2, **settings)
    try:
        assert isinstance(llm.engine.loaded.replica.groups.stages.pg, dist.ProcessGroupNCCL)
        outputs = llm.generate(prompts, params)
    finally:
        llm.engine.loaded.replica.shutdown()

    assert [o.outputs[0].token_ids for o in outputs] == single
