"""fused_moe (pairs sorted by expert, one grouped GEMM per projection) computes what its torch
reference computes: at decode and prefill sizes, with experts no token picks, with pairs routed to
another rank's experts, with weights stored input-major; and the sort pads each expert's pairs
into whole row tiles without depending on the routing for any size.

The kernel rounds the gate/up output and the activation where the reference does, but applies
the routing weight before rounding the down projection and sums in another order: a few units in
the last place (fp16: 2e-3 of the largest output, fp32: 1e-5). The interpreter multiplies bf16
tiles wrongly (see test_quant_matmul.py), so bf16 runs in the GPU test only.
"""

import pytest
import torch

pytest.importorskip("triton")

from kvflock.kernels.fused_moe import fused_moe, fused_moe_ref, sort_by_expert  # noqa: E402

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def random_moe(t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5
    logits = torch.randn(t, e, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return [a.to(device) for a in (x.to(dtype), w13.to(dtype), w2.to(dtype), ids, weights)]


def assert_matches_reference(x, w13, w2, ids, weights) -> None:
    out = fused_moe(x, w13, w2, ids, weights)
    ref = fused_moe_ref(x, w13, w2, ids, weights)
    tol = TOLERANCE[x.dtype]
    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("t", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_moe_matches_reference(device, t, dtype):
    """h and i not multiples of the 64-wide tiles; 40 tokens x 2 give the larger row tile."""
    assert_matches_reference(*random_moe(t, 48, 40, 6, 2, dtype, device, seed=t))


def test_experts_no_token_picks_contribute_nothing(device):
    x, w13, w2, ids, weights = random_moe(5, 32, 32, 8, 2, torch.float32, device)
    ids = ids % 3  # experts 3..7 idle
    ids[:, 1] = (ids[:, 0] + 1) % 3
    assert_matches_reference(x, w13, w2, ids, weights)


def test_pairs_for_another_ranks_experts_are_skipped(device):
    """Expert parallelism: id e (one past this rank's last expert) adds nothing here."""
    x, w13, w2, ids, weights = random_moe(7, 32, 32, 4, 2, torch.float32, device, seed=3)
    ids[::2, 1] = 4
    out = fused_moe(x, w13, w2, ids, weights)
    kept = ids < 4
    ref = fused_moe_ref(x, w13, w2, ids.where(kept, 0), weights * kept)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_input_major_weights_give_the_same_result(device):
    x, w13, w2, ids, weights = random_moe(9, 64, 32, 4, 2, torch.float32, device, seed=5)
    w13_im, w2_im = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w13, w2))
    assert w13_im.stride(1) == 1
    torch.testing.assert_close(fused_moe(x, w13_im, w2_im, ids, weights), fused_moe(x, w13, w2, ids, weights))


def test_sort_pads_each_experts_pairs_to_whole_tiles():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # pairs 0..5: experts 2, 0, 2, 1, 0, 2
    pair_ids, block_expert = sort_by_expert(ids, num_experts=4, block_m=4)
    # worst case: 6 pairs + 4 experts * 3 padding rows = 18 -> 5 tiles of 4, whatever the routing
    assert pair_ids.tolist() == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6, 6, 6, 6, 6, 6, 6, 6, 6]
    assert block_expert.tolist() == [0, 1, 2, -1, -1]


def test_sort_sizes_do_not_depend_on_the_routing():
    spread = torch.arange(16).view(8, 2) % 8
    same = torch.zeros(8, 2, dtype=torch.long)
    shapes = {tuple(t.shape for t in sort_by_expert(ids, 8, 16)) for ids in (spread, same)}
    assert len(shapes) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 512])
def test_fused_moe_matches_reference_at_qwen3_30b_shapes(gpu, t):
    """Qwen3-30B-A3B's layer: 128 experts of 2048 -> 768, top 8, bf16, input-major weights."""
    x, w13, w2, ids, weights = random_moe(t, 2048, 768, 128, 8, torch.bfloat16, gpu, seed=t)
    w13, w2 = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w13, w2))
    assert_matches_reference(x, w13, w2, ids, weights.to(torch.bfloat16))


@pytest.mark.parametrize("rank", [None, 0, 1], ids=["all-experts", "ep-rank0", "ep-rank1"])
def test_moe_block_gives_the_same_output_on_the_triton_and_torch_paths(device, rank):
    """The engine's block (router, fused weights, another rank's experts skipped under expert
    parallelism, Qwen2-MoE's shared expert) on both paths; a rank's part is its experts' share."""
    from kvflock.worker.config import ModelConfig
    from kvflock.worker.model.llama import MLP
    from kvflock.worker.model.moe import SparseMoE
    from kvflock.worker.model.parallel import TPGroup

    hf = {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 64, "hidden_size": 48, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
          "moe_intermediate_size": 40, "shared_expert_intermediate_size": 24, "norm_topk_prob": True}
    cfg = ModelConfig.from_hf(hf)
    group = TPGroup() if rank is None else TPGroup(rank=rank, world_size=2)  # no process group: no all-reduce
    blocks = []
    for triton in (True, False):
        torch.manual_seed(0)
        shared = MLP(cfg, TPGroup(), triton, 24, reduce_output=False)
        block = SparseMoE(cfg, group, triton, rank is not None, shared).to(device)
        for p in block.parameters():
            p.data.normal_(0, 0.2)
        block.fuse_experts(input_major_weights=True)
        blocks.append(block)
    x = torch.randn(13, 48, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        out, ref = (b(x) for b in blocks)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
