"""Block accounting: reference counts, block 0 reserved, misuse caught."""

import pytest

from kvflock.worker.kv.block_pool import BlockPool


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


def test_cached_block_is_found_again_after_its_last_user_frees_it():
    pool = BlockPool(4)
    [a, b] = pool.allocate(2)
    pool.cache(a, 111)
    pool.free([b, a])
    assert pool.num_free == 3 and pool.num_cached == 1
    assert pool.take_cached([111, 222]) == [a]
    assert pool.ref_count(a) == 1 and pool.num_free == 2


def test_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(3)
    [a, b] = pool.allocate(2)
    pool.cache(a, 1)
    pool.cache(b, 2)
    pool.free([a])
    pool.free([b])
    [reused] = pool.allocate(1)
    assert reused == a
    assert pool.take_cached([1]) == [] and pool.take_cached([2]) == [b]


def test_a_prefix_is_cached_once():
    pool = BlockPool(4)
    [a, b] = pool.allocate(2)
    pool.cache(a, 7)
    pool.cache(b, 7)
    assert pool.take_cached([7]) == [a]


def test_block_copies_coalesce_into_runs_that_advance_together():
    from kvflock.worker.kv.tiers import coalesce

    assert coalesce([(4, 10), (5, 11), (6, 12), (9, 13), (10, 14), (2, 2)]) == [(4, 10, 3), (9, 13, 2), (2, 2, 1)]
    assert coalesce([]) == []
