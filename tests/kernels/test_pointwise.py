"""rms_norm, rotary and silu_and_mul: each Triton kernel computes what its torch reference does.

The kernels and the references compute in float32 and round in the same places (rms_norm
twice: before and after the weight), but sum in another order, so a value near a rounding
boundary may land one unit in the last place apart at each rounding: two units at most
(atol/rtol 1.6e-2 for bf16, 2e-3 for fp16, 1e-5 for fp32). The interpreter (Triton 3.9)
rounds float32 to bf16 by truncation, one more unit of difference the same bounds cover; on
the GPU the residual sum is bit-equal to torch's.
"""

import pytest
import torch

pytest.importorskip("triton")

from kvflock.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from kvflock.kernels.norm import rms_norm, rms_norm_ref  # noqa: E402
from kvflock.kernels.rotary import (  # noqa: E402
    Llama3RopeScaling,
    rope_cos_sin_cache,
    rotary,
    rotary_ref,
)

TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LLAMA31 = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = TOLERANCE[ref.dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(device, dtype):
    x, w = randn(5, 3, 96, dtype=dtype, device=device), randn(96, dtype=dtype, device=device, seed=1)
    assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fuses_the_residual_add_and_returns_the_new_residual(device, dtype):
    x, w = randn(7, 200, dtype=dtype, device=device), randn(200, dtype=dtype, device=device, seed=1)
    residual = randn(7, 200, dtype=dtype, device=device, seed=2)
    out, new_residual = rms_norm(x, w, 1e-6, residual)
    ref_out, ref_residual = rms_norm_ref(x, w, 1e-6, residual)
    assert_close(new_residual, ref_residual)  # bit-equal on the GPU: see the gpu test
    assert_close(out, ref_out)


def test_rms_norm_reads_a_strided_input(device):
    x = randn(6, 256, dtype=torch.float16, device=device)[:, :128]
    w = randn(128, dtype=torch.float16, device=device, seed=1)
    assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(device, dtype):
    x = randn(2, 5, 2 * 80, dtype=dtype, device=device) * 3
    assert_close(silu_and_mul(x), silu_and_mul_ref(x))


def test_silu_and_mul_covers_rows_wider_than_one_tile(device):
    x = randn(3, 2 * 1500, dtype=torch.float32, device=device)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_rotary_matches_reference_on_strided_qkv_slices(device, dtype, num_q_heads, num_kv_heads):
    head_dim, t = 64, 9
    qkv = randn(t, num_q_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    q, k = qkv[:, :num_q_heads], qkv[:, num_q_heads : num_q_heads + num_kv_heads]
    cache = rope_cos_sin_cache(head_dim, 4096, 500000.0, LLAMA31, device=device)
    positions = torch.tensor([0, 1, 2, 17, 100, 1000, 2047, 4000, 4095], device=device)
    q_out, k_out = rotary(q, k, positions, cache)
    q_ref, k_ref = rotary_ref(q, k, positions, cache)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


def test_rotary_at_position_zero_is_the_identity(device):
    q = randn(2, 4, 32, dtype=torch.float32, device=device)
    cache = rope_cos_sin_cache(32, 8, 10000.0, device=device)
    q_out, _ = rotary(q, q[:, :1], torch.zeros(2, dtype=torch.long, device=device), cache)
    assert torch.equal(q_out, q)


def test_llama3_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=2048, num_attention_heads=16, max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    positions = torch.tensor([[0, 1, 5, 100, 1000, 3000]])
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    cache = rope_cos_sin_cache(128, 3001, 500000.0, LLAMA31)[positions[0]]
    torch.testing.assert_close(cache, torch.cat([cos[0, :, :64], sin[0, :, :64]], dim=-1), atol=2e-4, rtol=0)


@pytest.mark.gpu
def test_pointwise_kernels_at_llama_8b_shapes(gpu):
    """4096 hidden, 14336 intermediate, 32/8 heads of 128, 2048 tokens, bf16."""
    t, dtype = 2048, torch.bfloat16
    x, residual = randn(t, 4096, dtype=dtype, device=gpu), randn(t, 4096, dtype=dtype, device=gpu, seed=1)
    w = randn(4096, dtype=dtype, device=gpu, seed=2)
    out, new_residual = rms_norm(x, w, 1e-5, residual)
    ref_out, ref_residual = rms_norm_ref(x, w, 1e-5, residual)
    assert torch.equal(new_residual, ref_residual)
    assert_close(out, ref_out)

    gate_up = randn(t, 2 * 14336, dtype=dtype, device=gpu, seed=3)
    assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up))

    qkv = randn(t, 48, 128, dtype=dtype, device=gpu, seed=4)
    q, k = qkv[:, :32], qkv[:, 32:40]
    cache = rope_cos_sin_cache(128, 131072, 500000.0, LLAMA31, device=gpu)
    positions = torch.randint(0, 131072, (t,), device=gpu)
    for out, ref in zip(rotary(q, k, positions, cache), rotary_ref(q, k, positions, cache)):
        assert_close(out, ref)
