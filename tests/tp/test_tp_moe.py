"""Mixture-of-experts models under tensor parallelism give one rank's greedy output, whether each
rank holds a share of every expert or, with expert parallelism, whole experts: tiny random
Qwen3-MoE, Qwen2-MoE (shared expert, a dense layer) and Mixtral in float64 at TP=2, with chunked
prefill and preemption. Ranks are processes talking over gloo, as in CI."""

import pytest
import torch

from kvflock.worker.config import ModelConfig
from kvflock.worker.llm import LLM
from kvflock.worker.model.moe import SparseMoE
from kvflock.worker.model.parallel import check_tp_size
from tests.tiny_models import tiny_configs
from tests.tp.test_tp_greedy import SCENARIO, token_ids


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 5, 17, 33, 60)]


@pytest.mark.parametrize(
    "arch,expert_parallel",
    [("qwen3_moe", True), ("qwen2_moe", True), ("qwen2_moe", False), ("mixtral", True)],
    ids=["qwen3_moe-ep", "qwen2_moe-ep", "qwen2_moe-split", "mixtral-ep"],
)
def test_moe_greedy_output_at_tp2_equals_one_rank(arch, expert_parallel, tiny_models, prompts):
    reference = token_ids(LLM(str(tiny_models[arch]), **SCENARIO), prompts)
    llm = LLM(str(tiny_models[arch]), tensor_parallel_size=2, expert_parallel=expert_parallel, **SCENARIO)
    try:
        assert token_ids(llm, prompts) == reference
        assert all(len(set(ids)) > 1 for ids in reference), "degenerate reference"
        assert llm.engine.scheduler.num_preemptions > 0
        moe = llm.engine.loaded.model.model.layers[0].mlp
        assert isinstance(moe, SparseMoE)
        experts = moe.num_experts
        if expert_parallel:  # rank 0 holds the first half of the experts, each whole
            assert moe.w13.shape[0] == experts // 2
            assert list(moe.experts) == [str(e) for e in range(experts // 2)]
        else:  # every expert, half of its features
            assert moe.w13.shape[0] == experts and moe.w13.shape[1] == 32
    finally:
        llm.engine.loaded.replica.shutdown()


def test_expert_parallel_refuses_a_tp_size_that_does_not_divide_the_experts():
    hf = {**tiny_configs()["mixtral"].to_dict(), "architectures": ["MixtralForCausalLM"]}
    cfg = ModelConfig.from_hf(hf)  # 4 experts, 8 heads
    check_tp_size(cfg, 8, expert_parallel=False)
    with pytest.raises(ValueError, match="tensor_parallel_size: 8 does not divide the model's 4 experts"):
        check_tp_size(cfg, 8, expert_parallel=True)
