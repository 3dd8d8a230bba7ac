"""Rotary position embeddings (neox style: the head's two halves rotate together), with the
frequency scalings that Llama-family checkpoints use."""

import math
from typing import Any

import torch

from kvflock.kernels.rotary import rotary


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """float32 [head_dim // 2] rotation frequencies, after `scaling` (None, linear or llama3)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: one divisor per frequency
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    raise ValueError(f"rope_scaling: type {kind!r} is not supported (default, linear, llama3)")


def _llama3_scaling(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: stretch low frequencies by `factor`, keep high ones, blend in between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Applies the rotation for each token's absolute position to q and k ([t, heads, d]).

    The torch path computes angles per call in float32, exactly as transformers does; the
    Triton path reads a [max_positions, d] cos/sin table built once (in float64) per device.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int) -> None:
        super().__init__()
        # Plain attributes, not buffers: computed on the CPU even when the model is built on
        # the meta device, and moved to the tokens' device on first use.
        self.inv_freq = inverse_frequencies(head_dim, theta, scaling)
        self.max_positions = max_positions
        self._cos_sin: torch.Tensor | None = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, triton: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if triton:
            return rotary(q, k, positions, self._cos_sin_cache(positions.device))
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        if self._cos_sin is None or self._cos_sin.device != device:
            angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), self.inv_freq.cpu().double())
            self._cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(device)
        return self._cos_sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)).to(x.dtype)
