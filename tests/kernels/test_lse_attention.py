"""The Triton attention-with-log-sum-exp kernel computes what its torch reference computes, on
the position patterns context parallelism gives it: a rank's zigzag pieces (front padding
included) against another rank's, and a rank's striped share of the cache. On CPU it runs
through the Triton interpreter, in fp16 (see test_paged_attention for why not bf16)."""

import pytest
import torch

pytest.importorskip("triton")

from kvflock.kernels.lse_attention import attention_with_lse, attention_with_lse_ref  # noqa: E402
from kvflock.worker.parallel.context import zigzag_rows  # noqa: E402

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3}


def check(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype, device: torch.device,
          hq: int = 4, hkv: int = 2, d: int = 16) -> None:
    g = torch.Generator().manual_seed(len(q_pos) * 1000 + len(k_pos))
    q = torch.randn(len(q_pos), hq, d, generator=g).to(dtype).to(device)
    kv = torch.randn(len(k_pos), 2, hkv, d, generator=g).to(dtype).to(device)  # strided k and v, as the ring's
    q_pos, k_pos = q_pos.to(device), k_pos.to(device)

    out, lse = attention_with_lse(q, q_pos, kv[:, 0], kv[:, 1], k_pos, 0.25)
    ref_out, ref_lse = attention_with_lse_ref(q, q_pos, kv[:, 0], kv[:, 1], k_pos, 0.25)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse.float(), atol=tol, rtol=tol)


def pieces(n: int, cp: int, rank: int, start: int = 5) -> torch.Tensor:
    """Positions of a rank's zigzag pieces of a chunk after `start` cached tokens (-1: padding)."""
    rows = zigzag_rows(n, cp, rank)
    return torch.where(rows >= 0, rows + start, -1)


@pytest.mark.parametrize("n,cp,rank,origin", [(37, 2, 0, 0), (37, 2, 0, 1), (37, 2, 1, 0), (70, 4, 2, 3)])
def test_kernel_matches_reference_on_zigzag_pieces(n, cp, rank, origin, device):
    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    check(pieces(n, cp, rank), pieces(n, cp, origin), dtype, device)


def test_kernel_matches_reference_over_a_striped_share_of_the_cache(device):
    cp, rank = 4, 1
    k_pos = torch.arange(40) * cp + rank
    check(torch.tensor([3, 50, 159, 160, 161]), k_pos, torch.float16, device)


def test_queries_that_see_no_key_get_zero_and_minus_infinity(device):
    q = torch.randn(3, 4, 16, dtype=torch.float16, device=device)
    k = torch.randn(20, 2, 16, dtype=torch.float16, device=device)
    out, lse = attention_with_lse(q, torch.tensor([-1, 0, 2], device=device), k, k,
                                  torch.arange(20, device=device) + 5, 0.25)

    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.gpu
def test_kernel_matches_reference_at_a_real_shape(gpu):
    n, cp = 4096, 2
    check(pieces(n, cp, 0), pieces(n, cp, 1), torch.bfloat16, gpu, hq=32, hkv=8, d=128)
