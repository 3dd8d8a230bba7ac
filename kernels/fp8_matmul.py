"""FP8 (e4m3) W8A8 matmul: weights in e4m3 with one fp32 scale per output channel, activations
quantized to e4m3 per token at run time (dynamic scales). On GPUs that compute in FP8 (CUDA
capability 8.9 and later) `fp8_matmul` runs torch._scaled_mm with row-wise scales;
`fp8_matmul_ref` computes the same product in torch: both operands quantized, dequantized to
the activation's dtype, then multiplied (the CPU path, and what the tests compare against).
"""

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# An all-zero row still gets a positive scale, so nothing divides by zero.
_MIN_SCALE = 1e-12


def fp8_supported(device: torch.device) -> bool:
    """Whether torch._scaled_mm can run on `device` (CUDA capability 8.9: Ada, Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [..., k] as e4m3 with its own fp32 scale: (q [..., k], scale [..., 1]),
    x ≈ q * scale. Used for weights (a row is an output channel) and activations (a token)."""
    amax = x.abs().amax(-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_fp8_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as e4m3 with one fp32 scale for the whole tensor: (q, scale of shape [])."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [n, k] e4m3 with scale [n] (per row) back to `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def fp8_matmul_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., k] times the e4m3 weight [n, k] (scale [n]), x quantized per token as the GPU
    path does: [..., n] in x's dtype."""
    xq, x_scale = quantize_fp8_rows(x)
    return torch.matmul((xq.float() * x_scale).to(x.dtype), dequantize_fp8(weight, weight_scale, x.dtype).t())


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """fp8_matmul_ref's product through torch._scaled_mm: x quantized per token (scale_a [m, 1]),
    the row-major weight [n, k] passed transposed (the column-major [k, n] operand it wants)
    with scale_b [1, n]; row-wise scaling wants a bf16 output, cast to x's dtype after."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, weight.shape[0])
    xq, x_scale = quantize_fp8_rows(x2)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.float().view(1, -1),
                         out_dtype=torch.bfloat16)
    return y.to(x.dtype).reshape(*lead, weight.shape[0])
