"""The Triton paged-attention kernels compute what their torch references compute.

Small shapes run everywhere (on CPU through the Triton interpreter); the `gpu` tests run
real shapes. Tolerances: the kernels accumulate in float32 like the references but round the
softmax probabilities to the activation dtype before the P @ V product (the tensor cores'
input) and sum in another order, so outputs may differ by about two units in the last place:
2e-3 for fp16 and 1.6e-2 for bf16 on outputs of magnitude about 1. float32 gets 2e-3 too: on
the GPU, tl.dot multiplies float32 tiles in TF32 (Triton's default; 10-bit mantissa).

The interpreter (Triton 3.9) multiplies bfloat16 tiles as raw integers and rounds float32 to
fp8 wrongly, so on CPU the attention tests use fp16 activations (fp8 caches are made by
torch) and the fp8 write_kv test runs on the GPU only.
"""

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.kvcache_builders import make_block_tables, make_kv_cache, poison_unused  # noqa: E402

from kvflock.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    write_kv,
    write_kv_ref,
)

FP8 = torch.float8_e4m3fn
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3}


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = TOLERANCE[ref.dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def run_decode(
    device: torch.device, context_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
    block_size: int, dtype: torch.dtype, kv_dtype: torch.dtype, num_splits: int | None,
    k_scale: float = 1.0, v_scale: float = 1.0, seed: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    tables = make_block_tables(context_lens, block_size, num_blocks, gen)
    cache = make_kv_cache(num_blocks, 2, block_size, num_kv_heads, head_dim, kv_dtype, gen)
    poisoned = poison_unused(cache, tables, context_lens).to(device)
    cache, tables = cache.to(device), tables.to(device)
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    ref = paged_decode_attention_ref(q, cache[:, 1], tables, lens, scale, k_scale, v_scale)
    out = paged_decode_attention(q, poisoned[:, 1], tables, lens, scale, k_scale, v_scale, num_splits=num_splits)
    assert_close(out, ref)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference_for_gqa_ratios(device, group, num_splits):
    run_decode(device, [1, 37, 130], 2, group, 64, 16, torch.float16, torch.float16, num_splits)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_matches_reference_for_block_and_head_sizes(device, block_size, head_dim):
    run_decode(device, [33, 5, 96], 2, 4, head_dim, block_size, torch.float16, torch.float16, 2)


def test_decode_split_count_beyond_context_leaves_empty_splits_harmless(device):
    run_decode(device, [3, 70], 1, 4, 64, 16, torch.float16, torch.float16, 8)


def test_decode_chooses_its_own_split_count(device):
    run_decode(device, [300, 17], 2, 4, 64, 16, torch.float16, torch.float16, None)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_reads_fp8_cache_with_per_layer_scales(device, num_splits):
    run_decode(device, [45, 100], 2, 4, 64, 16, torch.float16, FP8, num_splits, k_scale=0.5, v_scale=2.0)


def test_decode_float32_queries(device):
    run_decode(device, [20, 77], 2, 3, 64, 16, torch.float32, torch.float32, 2)


def test_decode_reference_ignores_nan_past_the_context():
    """Slots past a context may hold NaN (a fresh fp8 cache does); the reference must not
    multiply them by zero probabilities into NaN outputs."""
    gen = torch.Generator().manual_seed(1)
    lens = [5, 40]
    tables = make_block_tables(lens, 16, 8, gen)
    cache = make_kv_cache(8, 1, 16, 2, 64, torch.float32, gen)
    q = torch.randn(2, 4, 64, generator=gen)
    clean = paged_decode_attention_ref(q, cache[:, 0], tables, torch.tensor(lens), 0.125)
    poisoned = poison_unused(cache, tables, lens)
    torch.testing.assert_close(
        paged_decode_attention_ref(q, poisoned[:, 0], tables, torch.tensor(lens), 0.125), clean
    )


def run_prefill(
    device: torch.device, prefix_lens: list[int], q_lens: list[int], num_kv_heads: int, group: int,
    head_dim: int, block_size: int, dtype: torch.dtype, kv_dtype: torch.dtype,
    k_scale: float = 1.0, v_scale: float = 1.0, seed: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    context_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    tables = make_block_tables(context_lens, block_size, num_blocks, gen)
    cache = make_kv_cache(num_blocks, 2, block_size, num_kv_heads, head_dim, kv_dtype, gen)
    poisoned = poison_unused(cache, tables, context_lens).to(device)
    cache, tables = cache.to(device), tables.to(device)
    t = sum(q_lens)
    q = torch.randn(t, num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    # k and v are already in the cache; both implementations read them from there.
    k = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    ref = paged_prefill_attention_ref(q, k, k, cache[:, 0], tables, cu, lens, scale, k_scale, v_scale)
    out = paged_prefill_attention(q, k, k, poisoned[:, 0], tables, cu, lens, scale, k_scale, v_scale)
    assert_close(out, ref)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_prefill_matches_reference_for_gqa_ratios(device, group):
    run_prefill(device, [0, 37, 16, 5], [20, 5, 1, 40], 2, group, 64, 16, torch.float16, torch.float16)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_matches_reference_for_block_and_head_sizes(device, block_size, head_dim):
    run_prefill(device, [50, 0], [19, 33], 1, 4, head_dim, block_size, torch.float16, torch.float16)


def test_prefill_skips_sequences_without_new_tokens(device):
    run_prefill(device, [10, 20, 3], [7, 0, 18], 2, 2, 64, 16, torch.float16, torch.float16)


def test_prefill_reads_fp8_cache_with_per_layer_scales(device):
    run_prefill(device, [40, 0], [9, 21], 2, 4, 64, 16, torch.float16, FP8, k_scale=0.5, v_scale=2.0)


def test_prefill_with_only_one_token_per_sequence_equals_decode(device):
    """A batch of single-token chunks is a decode step: both kernels must agree."""
    gen = torch.Generator().manual_seed(3)
    lens = [9, 50, 1]
    tables = make_block_tables(lens, 16, 12, gen)
    cache = make_kv_cache(12, 1, 16, 2, 64, torch.float16, gen).to(device)
    q = torch.randn(3, 8, 64, generator=gen).to(torch.float16).to(device)
    cu = torch.arange(4, dtype=torch.int32, device=device)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    tables = tables.to(device)
    prefill = paged_prefill_attention(q, q, q, cache[:, 0], tables, cu, lens_t, 0.125)
    decode = paged_decode_attention(q, cache[:, 0], tables, lens_t, 0.125, num_splits=1)
    assert_close(prefill, decode)


def make_write_inputs(
    device: torch.device, num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    kv_dtype: torch.dtype, gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v as strided slices of one fused QKV output; slots shuffled, every third one -1."""
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    k, v = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    cache = torch.zeros(9, 3, 2, 16, num_kv_heads, head_dim, dtype=kv_dtype, device=device)
    slots = (torch.randperm(8 * 16, generator=gen)[:num_tokens] + 16).to(device)
    slots[::3] = -1
    return k, v, cache, slots


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_write_kv_stores_each_token_at_its_slot_and_skips_minus_one(device, dtype):
    gen = torch.Generator().manual_seed(4)
    k, v, cache, slots = make_write_inputs(device, 40, 3, 64, dtype, dtype, gen)
    expected = cache.clone()
    write_kv_ref(k, v, expected[:, 1], slots)
    write_kv(k, v, cache[:, 1], slots)
    assert torch.equal(cache, expected)


@pytest.mark.gpu
def test_write_kv_quantizes_to_fp8_like_torch(gpu):
    gen = torch.Generator().manual_seed(5)
    k, v, cache, slots = make_write_inputs(gpu, 100, 8, 128, torch.bfloat16, FP8, gen)
    expected = cache.clone()
    write_kv_ref(k, v, expected[:, 2], slots, k_scale=0.02, v_scale=0.03)
    write_kv(k, v, cache[:, 2], slots, k_scale=0.02, v_scale=0.03)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.gpu
def test_write_kv_saturates_fp8_instead_of_nan(gpu):
    k = torch.full((1, 1, 64), 1000.0, device=gpu)
    cache = torch.zeros(2, 1, 2, 16, 1, 64, dtype=FP8, device=gpu)
    write_kv(k, -k, cache[:, 0], torch.tensor([16], device=gpu))
    assert torch.all(cache[1, 0, 0, 0].float() == 448.0)
    assert torch.all(cache[1, 0, 1, 0].float() == -448.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_dtype", ["same", FP8])
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32), (128, 32)])
def test_decode_at_real_shapes(gpu, dtype, kv_dtype, head_dim, block_size):
    """Llama-3-8B heads (32 q, 8 kv), 24 sequences of up to 5k tokens, default split choice
    and forced splits."""
    gen = torch.Generator().manual_seed(6)
    lens = torch.randint(1, 5000, (24,), generator=gen).tolist()
    kv = dtype if kv_dtype == "same" else kv_dtype
    scales = (1.0, 1.0) if kv_dtype == "same" else (0.7, 1.3)
    for num_splits in (None, 1, 7):
        run_decode(gpu, lens, 8, 4, head_dim, block_size, dtype, kv, num_splits, *scales)
    run_decode(gpu, [32000], 8, 4, head_dim, block_size, dtype, kv, None, *scales)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 32)])
def test_prefill_at_real_shapes(gpu, dtype, head_dim, block_size):
    """Chunked prefill over cached prefixes: chunks of up to 1.5k tokens after up to 3k cached."""
    prefixes, chunks = [0, 1000, 3001, 77, 0], [1536, 512, 999, 1, 300]
    run_prefill(gpu, prefixes, chunks, 8, 4, head_dim, block_size, dtype, dtype)
    run_prefill(gpu, [700, 0], [300, 200], 8, 4, head_dim, block_size, dtype, FP8, 0.6, 1.4)

