"""Our torch dequantization of GGUF tensors equals the gguf package's reference routines."""

import gguf
import numpy as np
import pytest
import torch

from kvflock.worker.model.gguf_quants import BLOCKS, dequantize, stored_bytes


def _random_bytes(type_name: str, numel: int, rng: np.random.Generator) -> np.ndarray:
    if type_name in ("F32", "F16", "BF16"):
        values = rng.standard_normal(numel).astype(np.float32)
        if type_name == "F16":
            return values.astype(np.float16).view(np.uint8)
        return values.view(np.uint8) if type_name == "F32" else (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    values, size = BLOCKS[type_name]
    blocks = rng.integers(0, 256, size=(numel // values, size), dtype=np.uint8)
    # finite float16 scales (and minimums) in place of random bit patterns
    halves = 2 if type_name == "Q4_1" else 1
    blocks[:, :2 * halves] = (rng.standard_normal((numel // values, halves)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


@pytest.mark.parametrize("type_name", sorted(BLOCKS))
def test_dequantize_matches_gguf(type_name: str) -> None:
    shape = (6, 64)
    raw = _random_bytes(type_name, 6 * 64, np.random.default_rng(0))
    assert raw.size == stored_bytes(type_name, 6 * 64)
    kind = gguf.GGMLQuantizationType[type_name]
    if type_name in ("F32", "F16"):
        expected = raw.view(np.float32 if type_name == "F32" else np.float16).astype(np.float32).reshape(shape)
    else:
        expected = gguf.quants.dequantize(raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, kind)), kind)
    ours = dequantize(raw, type_name, shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    torch.testing.assert_close(ours, torch.from_numpy(np.asarray(expected, dtype=np.float32)), rtol=0, atol=0)


def test_partial_block_is_refused() -> None:
    with pytest.raises(ValueError, match="whole Q4_1 blocks"):
        stored_bytes("Q4_1", 40)
