"""quant_matmul (int4/int8 weights packed into the kernels' tiled, interleaved layout) computes
what its torch reference computes on both of its paths (GEMV for 1-4 rows, GEMM above), and
packing inverts unpacking.

The reference and the GEMM round each dequantized weight to the activation dtype and accumulate
in float32; the GEMV keeps the weight in float32 and scales each tile's sum. So they differ by a
rounding of the weights at most: rtol/atol of a few units in the last place of the output
(fp16: 2e-3 of the largest output; fp32: 1e-5). The interpreter (Triton 3.9) multiplies
bfloat16 tiles as raw integers, so on CPU bf16 runs only in the GPU test.
"""

import pytest
import torch

pytest.importorskip("triton")

from kvflock.kernels.quant_matmul import (  # noqa: E402
    PackedWeight,
    pack_weight,
    quant_matmul,
    quant_matmul_ref,
    tile_size,
    unpack_codes,
)

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def random_packed(k: int, n: int, bits: int, group_size: int, device: torch.device, seed: int = 0) -> PackedWeight:
    """Packed weights with every code and zero point possible, scales of a real layer's size."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size < 0 else k // group_size
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 / 2 ** (bits - 4) + 1e-4).half()
    packed = pack_weight(q, zeros, scales, bits, group_size)
    return PackedWeight(packed.words.to(device), packed.scales.to(device), packed.zeros.to(device), bits, group_size)


def tensors(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return packed.words, packed.scales, packed.zeros


def assert_matches_reference(x: torch.Tensor, packed: PackedWeight, **kwargs) -> None:
    out = quant_matmul(x, *tensors(packed), packed.bits, packed.group_size, **kwargs)
    ref = quant_matmul_ref(x, *tensors(packed), packed.bits, packed.group_size)
    tol = TOLERANCE[x.dtype]
    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("bits,group_size,k", [(4, 32, 96), (4, 128, 384), (8, -1, 208), (4, -1, 576)])
def test_packing_round_trips_every_code(bits, group_size, k):
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 2**bits, (k, 24), generator=gen, dtype=torch.int32)
    groups = 1 if group_size < 0 else k // group_size
    packed = pack_weight(q, torch.ones(groups, 24, dtype=torch.int32), torch.ones(groups, 24).half(), bits, group_size)
    assert torch.equal(unpack_codes(packed.words, bits), q)


def test_a_tile_holds_each_words_codes_a_tile_eighth_apart():
    """int4, tile 128: word w of a column's tile holds input features w, w + 16, ..., w + 112
    (code b at bits 4b), so one shift of 16 consecutive words gives 16 consecutive features."""
    k = 128
    q = (torch.arange(k) % 16).view(k, 1).repeat(1, 8)
    packed = pack_weight(q, torch.ones(1, 8, dtype=torch.int32), torch.ones(1, 8).half(), 4, 128)
    assert tile_size(k, 128) == 128 and packed.words.shape == (1, 8, 16)
    for w in range(16):
        expected = sum(((w + b * 16) % 16) << (4 * b) for b in range(8))
        assert packed.words[0, 0, w].item() == (expected - 2**32 if expected >= 2**31 else expected)


def test_tiles_fit_inside_groups_and_k():
    assert tile_size(4096, 128) == 128 and tile_size(576, 64) == 64 and tile_size(576, 576) == 64
    assert tile_size(14336, 14336) == 128 and tile_size(96, 32) == 32 and tile_size(208, 208) == 16


def test_dequantize_applies_each_groups_scale_and_zero_point():
    k, n = 32, 8
    codes = torch.full((k, n), 9)
    zeros = torch.tensor([[4] * n, [8] * n])
    scales = torch.tensor([[0.5] * n, [0.25] * n]).half()
    w = pack_weight(codes, zeros, scales, 4, 16).dequantize()
    assert torch.equal(w[:16], torch.full((16, n), (9 - 4) * 0.5))
    assert torch.equal(w[16:], torch.full((16, n), (9 - 8) * 0.25))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_batches_of_one_to_four_match_reference(device, m, dtype):
    k, n = 96, 104  # odd multiples of the group (32) and of the pack factor (8)
    packed = random_packed(k, n, 4, 32, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
    assert_matches_reference(x, packed)


@pytest.mark.parametrize("m", [5, 16, 17, 40, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemm_batches_above_four_match_reference(device, m, dtype):
    k, n = 96, 104
    packed = random_packed(k, n, 4, 32, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
    assert_matches_reference(x, packed)


@pytest.mark.parametrize("m", [1, 17])
def test_int4_in_groups_of_128_matches_reference(device, m):
    """Groups of 128: the layout of Llama-sized layers, a whole tile per group."""
    packed = random_packed(384, 40, 4, 128, device)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).half().to(device)
    assert_matches_reference(x, packed)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_per_channel_matches_reference(device, m, dtype):
    packed = random_packed(208, 44, 8, -1, device)  # k = 13 tiles of 16
    x = torch.randn(m, 208, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
    assert_matches_reference(x, packed)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, -1)])
@pytest.mark.parametrize("m", [2, 8])
@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_sums_partial_products_like_one_pass(device, bits, group_size, m, split_k):
    packed = random_packed(256, 48, bits, group_size, device, seed=3)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(4)).to(torch.float16).to(device)
    assert_matches_reference(x, packed, split_k=split_k)


@pytest.mark.parametrize("m", [1, 6])
def test_column_views_of_a_fused_weight_multiply_like_copies(device, m):
    """The gate and up halves of a fused [gate | up] weight are strided views."""
    packed = random_packed(64, 64, 4, 32, device, seed=5)
    half = (packed.words[:, 32:], packed.scales[:, 32:], packed.zeros[:, 32:])
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(6)).to(device)
    torch.testing.assert_close(quant_matmul(x, *half, 4, 32), quant_matmul(x, *(t.contiguous() for t in half), 4, 32))


def test_leading_dimensions_are_kept(device):
    packed = random_packed(64, 16, 4, 32, device)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(7)).to(device)
    assert quant_matmul(x, *tensors(packed), 4, 32).shape == (2, 3, 16)


def test_an_empty_batch_gives_an_empty_output(device):
    packed = random_packed(64, 16, 4, 32, device)
    assert quant_matmul(torch.empty(0, 64, device=device), *tensors(packed), 4, 32).shape == (0, 16)


def test_shapes_that_do_not_fit_are_refused_naming_them(device):
    words, scales, zeros = tensors(random_packed(64, 16, 4, 32, device))
    with pytest.raises(ValueError, match="group_size"):
        quant_matmul(torch.randn(1, 64, device=device), words, scales, zeros, 4, 48)
    with pytest.raises(ValueError, match="do not fit"):
        quant_matmul(torch.randn(1, 64, device=device), words, scales[:1], zeros, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        quant_matmul(torch.randn(1, 64, device=device), words, scales, zeros, 3, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_weight(torch.zeros(72, 8, dtype=torch.int32), torch.zeros(1, 8), torch.ones(1, 8), 8, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 16, 64, 256, 1024])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, -1)])
def test_llama3_8b_shapes_match_reference_on_gpu(gpu, m, bits, group_size):
    for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        packed = random_packed(k, n, bits, group_size, gpu, seed=k + n)
        x = torch.randn(m, k, device=gpu, dtype=torch.bfloat16)
        assert_matches_reference(x, packed)
