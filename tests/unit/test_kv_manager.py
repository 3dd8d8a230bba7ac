"""The KV cache manager and the scheduler's step plan: transfers between the KV tiers are
planned, never carried out, by the scheduler, and a restore that falls short leaves the
accounting consistent."""

from kvflock.shared.hashing import hash_blocks
from kvflock.worker.config import SamplingParams
from kvflock.worker.kv.manager import KVCacheManager
from kvflock.worker.scheduler import Scheduler
from kvflock.worker.sequence import SampleResult, Sequence

BLOCK = 4


class _Tiers:
    """Lower tiers that hold the given hashes and always find restoring worth it."""

    def __init__(self, hashes: set[int]) -> None:
        self.hashes = hashes

    def contains(self, block_hash: int) -> bool:
        return block_hash in self.hashes

    def worth_restoring(self, block_hash: int, block_size: int) -> bool:
        return True


def _seq(seq_id: int, prompt: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, prompt, SamplingParams(max_tokens=4, ignore_eos=True))


def test_a_restore_that_falls_short_takes_the_sequence_out_of_the_step_and_recomputes_the_rest():
    prompt = list(range(13))  # three full blocks and one token
    kv = KVCacheManager(16, BLOCK, lower_tiers=_Tiers(set(hash_blocks(prompt, BLOCK))))
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    seq = _seq(0, prompt)
    scheduler.add(seq)

    plan = scheduler.schedule()
    [restore] = plan.kv_transfers.restores
    assert len(restore.block_ids) == 3 and plan.scheduled[0].start == 12

    plan = scheduler.on_kv_restored(plan, [1])  # only the first block was still intact below
    assert plan.scheduled == [] and seq.num_computed_tokens == BLOCK
    assert kv.pool.num_cached == 1 and scheduler.prefix_hit_tokens == BLOCK

    retry = scheduler.schedule()
    [item] = retry.scheduled
    assert (item.start, item.token_ids, item.block_ids) == (BLOCK, prompt[BLOCK:], kv.block_ids(seq))
    assert retry.kv_transfers.restores == []

    scheduler.finish(seq)
    assert kv.pool.num_free == kv.pool.capacity


def test_a_cached_block_handed_out_again_is_planned_as_an_offload_before_the_step():
    kv = KVCacheManager(3, BLOCK, lower_tiers=_Tiers(set()))  # two usable blocks
    scheduler = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    first = _seq(0, list(range(5)))
    scheduler.add(first)
    plan = scheduler.schedule()
    scheduler.update(plan, [[SampleResult(7, None)]], lambda seq: setattr(seq, "finish_reason", "length"))
    assert first.is_finished and kv.pool.num_cached == 1

    scheduler.add(_seq(1, [9] * 8))
    plan = scheduler.schedule()
    assert plan.kv_transfers.offloads == [(plan.scheduled[0].block_ids[1], hash_blocks(list(range(5)), BLOCK)[0])]


def test_the_plan_keeps_its_copies_when_the_sequence_moves_on():
    kv = KVCacheManager(16, BLOCK)
    scheduler = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    seq = _seq(0, list(range(4)))
    scheduler.add(seq)
    plan = scheduler.schedule()
    scheduler.update(plan, [[SampleResult(4, None)]], lambda seq: None)
    scheduler.schedule()
    [item] = plan.scheduled
    assert (item.start, item.token_ids, len(item.block_ids)) == (0, [0, 1, 2, 3], 1)
    assert seq.num_computed_tokens == 5 and len(kv.block_ids(seq)) == 2
