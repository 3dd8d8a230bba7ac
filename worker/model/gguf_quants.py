"""Dequantizing the GGUF tensor types the loader reads, whole tensors at a time in torch.

gguf's own routines work block by block in numpy: for SmolLM2's Q4_1 file they took 7.7 s of a
worker's 12 s weight load under load, on every restart; these take a fraction of a second. Each
quantized block stores its scale (and, for Q4_1, its minimum) as float16 followed by the codes:
Q4_0 and Q4_1 pack 32 four-bit codes in 16 bytes (low nibbles are the first 16 values, high
nibbles the last 16), Q8_0 holds 32 signed bytes."""

import numpy as np
import torch

# type -> (values per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34),
}


def stored_bytes(type_name: str, numel: int) -> int:
    """Bytes that `numel` values of `type_name` take in the file."""
    values, size = BLOCKS[type_name]
    if numel % values:
        raise ValueError(f"{numel} values do not fill whole {type_name} blocks of {values}")
    return numel // values * size


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of `shape` that the bytes `raw` (uint8, as stored) hold."""
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True).reshape(-1))
    if type_name == "F32":
        out = data.view(torch.float32)
    elif type_name == "F16":
        out = data.view(torch.float16).float()
    elif type_name == "BF16":
        out = data.view(torch.bfloat16).float()
    else:
        out = _dequantize_blocks(data.view(-1, BLOCKS[type_name][1]), type_name)
    return out.reshape(shape)


def _dequantize_blocks(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    scale = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    if type_name == "Q8_0":
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * scale).reshape(-1)
    packed = blocks[:, -16:]
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()  # [n, 32]
    if type_name == "Q4_0":
        return ((codes - 8.0) * scale).reshape(-1)
    minimum = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return (codes * scale + minimum).reshape(-1)
