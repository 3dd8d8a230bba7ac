"""RMSNorm with an optional fused residual add: the torch reference and its Triton kernel.

Rounding follows Hugging Face's Llama so that both paths match it: the residual sum is
rounded to the activation dtype (it is the next layer's residual), the normalization runs in
float32 and is rounded before the weight multiplies it.
"""

import torch

from kvflock.kernels._triton import jit, tl


def rms_norm_ref(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`w * x / rms(x)` over the last axis. With `residual`, normalizes `x + residual` and
    returns `(out, x + residual)`: the new residual stream, saved for the next add."""
    if residual is not None:
        x = x + residual
    h = x.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (normed.float() * w.float()).to(x.dtype)
    return out if residual is None else (out, x)


@jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, w_ptr, out_ptr, residual_out_ptr, hidden, eps,
    stride_x, stride_residual,
    BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):
    """One row, whole in registers (hidden <= BLOCK): one read of each input, one write of
    each output."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    normed = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with a contiguous last axis, without a copy when it allows one."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_ref`; outputs are new contiguous tensors."""
    hidden = x.shape[-1]
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_rows = _rows(residual) if residual is not None else rows
    residual_out = torch.empty_like(out) if residual is not None else out
    block = 1 << max(hidden - 1, 0).bit_length()
    _rms_norm_kernel[(rows.shape[0],)](
        rows, residual_rows, w, out, residual_out, hidden, eps,
        rows.stride(0), residual_rows.stride(0),
        BLOCK=block, ADD_RESIDUAL=residual is not None,
        num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16,
    )
    return out if residual is None else (out, residual_out)
