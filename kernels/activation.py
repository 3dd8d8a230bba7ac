"""SiLU-and-multiply, the gated MLP's activation: the torch reference and its Triton kernel."""

import torch

from kvflock.kernels._triton import jit, tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [..., 2 * d] laid out as [gate | up] (the fused gate/up
    projection's output); computed in float32, rounded once. Returns [..., d]."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, BLOCK: tl.constexpr):
    """BLOCK columns of one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_ref`; the output is a new contiguous tensor."""
    d = x.shape[-1] // 2
    rows = x if x.dim() == 2 else x.reshape(-1, 2 * d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    block = min(1024, 1 << max(d - 1, 0).bit_length())
    _silu_and_mul_kernel[(rows.shape[0], -(-d // block))](rows, out, d, rows.stride(0), BLOCK=block, num_warps=4)
    return out
