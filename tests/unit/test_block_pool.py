"""Block accounting: reference counts, block 0 reserved, misuse caught."""

import pytest

from kvfleet.worker.kv.block_pool import BlockPool


def test_block_zero_is_never_handed_out():
    pool = BlockPool(5)
    assert sorted(pool.allocate(4)) == [1, 2, 3, 4]
    assert not pool.can_allocate(1)


def test_shared_block_returns_only_when_last_user_frees_it():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.share(blocks[:1])
    pool.free(blocks)
    assert pool.num_free == 2 and pool.ref_count(blocks[0]) == 1
    pool.free(blocks[:1])
    assert pool.num_free == pool.capacity == 3


def test_double_free_and_over_allocation_are_errors():
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([b])
    with pytest.raises(RuntimeError, match="asked for 3"):
        pool.allocate(3)


def test_pool_needs_a_usable_block():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)
