"""lora_shrink / lora_expand (tokens grouped by adapter slot) compute what their torch
references compute, the references compute x A^T B^T per token's adapter, and a column slice
of a fused output is updated in place without touching its neighbours."""

import pytest
import torch

pytest.importorskip("triton")

from kvflock.kernels.lora import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref  # noqa: E402


def grouped(token_slots: list[int], num_slots: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`order` and `seg_starts` of a batch whose token i uses slot token_slots[i] (-1: none),
    padded like a captured graph's buffers."""
    order = [i for s in range(num_slots) for i, ts in enumerate(token_slots) if ts == s]
    starts = [0]
    for s in range(num_slots):
        starts.append(starts[-1] + token_slots.count(s))
    padded = order + [0] * (len(token_slots) - len(order))
    return torch.tensor(padded, device=device), torch.tensor(starts, device=device)


def random_case(t: int, h: int, n: int, r: int, slots: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    token_slots = torch.randint(-1, slots, (t,), generator=gen).tolist()
    x = torch.randn(t, h, generator=gen).to(device, dtype)
    a = (torch.randn(slots, r, h, generator=gen) / h**0.5).to(device, dtype)
    b = (torch.randn(slots, n, r, generator=gen) / r**0.5).to(device, dtype)
    return token_slots, x, a, b


def expected(token_slots, x, a, b, out):
    want = out.double().clone()
    for i, s in enumerate(token_slots):
        if s >= 0:
            want[i] += x[i].double() @ a[s].double().t() @ b[s].double().t()
    return want


@pytest.mark.parametrize("t,h,n,r,slots", [(1, 64, 48, 8, 1), (5, 96, 40, 16, 3), (37, 64, 130, 32, 4)])
def test_reference_is_x_a_b_per_token(t, h, n, r, slots):
    token_slots, x, a, b = random_case(t, h, n, r, slots, torch.float64, torch.device("cpu"))
    order, seg = grouped(token_slots, slots, x.device)
    out = torch.randn(t, n, dtype=torch.float64)
    want = expected(token_slots, x, a, b, out)
    lora_expand_ref(lora_shrink_ref(x, a, order, seg), b, order, seg, out)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("t,h,n,r,slots", [(1, 64, 48, 8, 1), (5, 96, 40, 16, 3), (37, 64, 130, 64, 4)])
def test_kernels_match_reference(t, h, n, r, slots, device):
    token_slots, x, a, b = random_case(t, h, n, r, slots, torch.float32, device, seed=t)
    order, seg = grouped(token_slots, slots, device)
    y = lora_shrink(x, a, order, seg)
    y_ref = lora_shrink_ref(x, a, order, seg)
    rows = [i for i, s in enumerate(token_slots) if s >= 0]
    torch.testing.assert_close(y[rows], y_ref[rows], atol=1e-4, rtol=1e-4)
    base = torch.randn(t, n, device=device)
    out, out_ref = lora_expand(y_ref, b, order, seg, base.clone()), lora_expand_ref(y_ref, b, order, seg, base.clone())
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)


def test_expand_into_a_column_slice_leaves_the_rest(device):
    token_slots, x, a, b = random_case(9, 64, 32, 16, 2, torch.float32, device, seed=3)
    order, seg = grouped(token_slots, 2, device)
    fused = torch.randn(9, 96, device=device)
    before = fused.clone()
    y = lora_shrink(x, a, order, seg)
    lora_expand(y, b, order, seg, fused[:, 32:64])
    torch.testing.assert_close(fused[:, :32], before[:, :32], atol=0, rtol=0)
    torch.testing.assert_close(fused[:, 64:], before[:, 64:], atol=0, rtol=0)
    want = expected(token_slots, x, a, b, before[:, 32:64])
    torch.testing.assert_close(fused[:, 32:64].double(), want, atol=1e-4, rtol=1e-4)


def test_tokens_without_adapter_are_untouched(device):
    _, x, a, b = random_case(16, 64, 32, 8, 2, torch.float32, device)
    order, seg = grouped([-1] * 16, 2, device)
    out = torch.randn(16, 32, device=device)
    want = out.clone()
    lora_expand(lora_shrink(x, a, order, seg), b, order, seg, out)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("t,slots", [(64, 64), (64, 8), (2048, 8)])
def test_kernels_match_reference_at_llama_8b_shapes(t, slots, r, gpu):
    """q_proj-in / gate_up-out sizes of Llama-3-8B, bfloat16, decode and prefill batches."""
    token_slots, x, a, b = random_case(t, 4096, 14336, r, slots, torch.bfloat16, gpu)
    order, seg = grouped(token_slots, slots, gpu)
    y = lora_shrink(x, a, order, seg)
    y_ref = lora_shrink_ref(x, a, order, seg)
    rows = [i for i, s in enumerate(token_slots) if s >= 0]
    torch.testing.assert_close(y[rows].float(), y_ref[rows].float(), atol=3e-2, rtol=2e-2)
    base = torch.randn(t, 14336, device=gpu, dtype=torch.bfloat16)
    out = lora_expand(y_ref, b, order, seg, base.clone())
    out_ref = lora_expand_ref(y_ref, b, order, seg, base.clone())
    torch.testing.assert_close(out.float(), out_ref.float(), atol=3e-2, rtol=2e-2)
