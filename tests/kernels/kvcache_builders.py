"""Builders of paged KV caches for the attention tests: scattered block ids, ragged lengths,
and poisoned slots (block 0 and every slot past a context hold NaN) so that a kernel that
reads what it must not read fails loudly."""

import torch


def make_block_tables(
    context_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator
) -> torch.Tensor:
    """[b, max_blocks + 1] int32 of distinct shuffled block ids >= 1, padded with block 0."""
    needed = [-(-n // block_size) for n in context_lens]
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(context_lens), max(needed) + 1, dtype=torch.int32)
    for i, n in enumerate(needed):
        table[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    return table


def make_kv_cache(
    num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, gen: torch.Generator,
) -> torch.Tensor:
    """A random cache [num_blocks, num_layers, 2, block_size, hkv, d]; fp8 values in range."""
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype)


def poison_unused(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: list[int]
) -> torch.Tensor:
    """A copy of the whole cache with NaN in block 0 and past every sequence's context."""
    poisoned = kv_cache.clone()
    block_size = kv_cache.shape[3]
    nan = torch.tensor(float("nan")).to(kv_cache.dtype)
    poisoned[0] = nan
    for i, n in enumerate(context_lens):
        last = int(block_tables[i, (n - 1) // block_size])
        poisoned[last, :, :, (n - 1) % block_size + 1 :] = nan
    return poisoned
