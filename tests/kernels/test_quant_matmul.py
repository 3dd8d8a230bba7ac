"""quant_matmul (int4/int8 weights in GPTQ packing, dequantized in registers) computes what its
torch reference computes, and the packing helpers invert each other.

Both paths round each dequantized weight to the activation dtype and accumulate in float32,
so they differ by summation order only: a few units in the last place of the output (fp16:
rtol/atol 2e-3 on outputs of magnitude ~1-30; fp32: 1e-5). The interpreter (Triton 3.9)
multiplies bfloat16 tiles as raw integers, so on CPU bf16 runs only in the GPU test.
"""

import pytest
import torch

pytest.importorskip("triton")

from kvflock.kernels.quant_matmul import (  # noqa: E402
    dequantize,
    pack_columns,
    pack_rows,
    quant_matmul,
    quant_matmul_ref,
    unpack_columns,
    unpack_rows,
)

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def random_quantized(k: int, n: int, bits: int, group_size: int, device: torch.device, seed: int = 0):
    """Packed weights with every code and zero point possible, scales of a real layer's size."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size < 0 else k // group_size
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen)  # stored zero - 1
    scales = (torch.rand(groups, n, generator=gen) * 0.02 / 2 ** (bits - 4) + 1e-4).half()
    return pack_rows(q, bits).to(device), scales.to(device), pack_columns(zeros, bits).to(device)


def assert_matches_reference(x, packed, bits, group_size, **kwargs) -> None:
    out = quant_matmul(x, *packed, bits, group_size, **kwargs)
    ref = quant_matmul_ref(x, *packed, bits, group_size)
    tol = TOLERANCE[x.dtype]
    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips_every_value(bits):
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, 2**bits, (64, 24), generator=gen, dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(values, bits), bits), values)
    assert torch.equal(unpack_columns(pack_columns(values, bits), bits), values)


def test_packing_follows_gptq_bit_order():
    """Value i of a packed int32 sits at bits 4i (int4), so 0..7 along k packs to 0x76543210."""
    packed = pack_rows(torch.arange(8).view(8, 1), 4)
    assert packed.item() == 0x76543210
    assert pack_rows(torch.full((8, 1), 15), 4).item() == -1  # all ones, as the int32 GPTQ stores


def test_dequantize_applies_each_groups_scale_and_gptq_zero_plus_one():
    k, n = 32, 8
    codes = torch.full((k, n), 9)
    zeros = torch.tensor([[3] * n, [7] * n])  # stored zero - 1: zero points 4 and 8
    scales = torch.tensor([[0.5] * n, [0.25] * n]).half()
    w = dequantize(pack_rows(codes, 4), scales, pack_columns(zeros, 4), 4, 16)
    assert torch.equal(w[:16], torch.full((16, n), (9 - 4) * 0.5))
    assert torch.equal(w[16:], torch.full((16, n), (9 - 8) * 0.25))


@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_grouped_matches_reference(device, m, dtype):
    k, n = 96, 104  # odd multiples of the group (32) and of the pack factor (8)
    packed = random_quantized(k, n, 4, 32, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
    assert_matches_reference(x, packed, 4, 32)


@pytest.mark.parametrize("m", [1, 17])
def test_int4_in_groups_of_128_matches_reference(device, m):
    """Groups of 128: the layout of Llama-sized layers, a whole k tile per group."""
    k, n = 384, 40
    packed = random_quantized(k, n, 4, 128, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().to(device)
    assert_matches_reference(x, packed, 4, 128)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_per_channel_matches_reference(device, m, dtype):
    k, n = 200, 44  # k not a multiple of the kernel's k tile
    packed = random_quantized(k, n, 8, -1, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
    assert_matches_reference(x, packed, 8, -1)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, -1)])
@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_sums_partial_products_like_one_pass(device, bits, group_size, split_k):
    k, n = 256, 48
    packed = random_quantized(k, n, bits, group_size, device, seed=3)
    x = torch.randn(2, 4, k, generator=torch.Generator().manual_seed(4)).to(torch.float16).to(device)
    assert_matches_reference(x, packed, bits, group_size, split_k=split_k)


def test_column_views_of_a_fused_weight_multiply_like_copies(device):
    """The gate and up halves of a fused [gate | up] weight are strided views."""
    k, n = 64, 64
    qweight, scales, qzeros = random_quantized(k, n, 4, 32, device, seed=5)
    half = (qweight[:, 32:], scales[:, 32:], qzeros[:, 4:])
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(6)).to(device)
    torch.testing.assert_close(quant_matmul(x, *half, 4, 32), quant_matmul(x, *(t.contiguous() for t in half), 4, 32))


def test_an_empty_batch_gives_an_empty_output(device):
    packed = random_quantized(64, 16, 4, 32, device)
    assert quant_matmul(torch.empty(0, 64, device=device), *packed, 4, 32).shape == (0, 16)


def test_shapes_that_do_not_fit_are_refused_naming_them(device):
    qweight, scales, qzeros = random_quantized(64, 16, 4, 32, device)
    with pytest.raises(ValueError, match="group_size"):
        quant_matmul(torch.randn(1, 64, device=device), qweight, scales, qzeros, 4, 48)
    with pytest.raises(ValueError, match="do not fit"):
        quant_matmul(torch.randn(1, 64, device=device), qweight, scales[:1], qzeros, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        quant_matmul(torch.randn(1, 64, device=device), qweight, scales, qzeros, 3, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, -1)])
def test_llama3_8b_shapes_match_reference_on_gpu(gpu, m, bits, group_size):
    for k, n in ((4096, 6144), (4096, 28672), (14336, 4096)):
        packed = random_quantized(k, n, bits, group_size, gpu, seed=k + n)
        x = torch.randn(m, k, device=gpu, dtype=torch.bfloat16)
        assert_matches_reference(x, packed, bits, group_size)
