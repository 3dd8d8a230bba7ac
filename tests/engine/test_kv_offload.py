"""KV offload tiers: blocks evicted from the GPU pool go to CPU memory, then to disk, and come
back instead of being recomputed, with outputs identical to a run without offload; the disk
tier survives a restart, and a truncated or foreign file is detected and ignored."""

from pathlib import Path

import pytest
import torch

from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM
from tests.tiny_models import VOCAB

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BLOCK = 4
# One block of the tiny Llama in float64: layers * (K, V) * block * kv heads * head_dim * 8 bytes.
BLOCK_BYTES = 2 * 2 * BLOCK * 2 * 8 * 8


def gib(blocks: int) -> float:
    return blocks * BLOCK_BYTES / 2**30


def make(path: Path, **settings) -> LLM:
    return LLM(str(path), dtype="float64", max_model_len=64, block_size=BLOCK, num_kv_blocks=24, **settings)


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    fillers = [torch.randint(0, VOCAB, (44,), generator=g).tolist() for _ in range(3)]
    return {"target": target, "fillers": fillers}


@pytest.fixture(scope="module")
def reference(tiny_models, prompts) -> list[int]:
    llm = LLM(str(tiny_models["llama"]), dtype="float64", max_model_len=64, enable_prefix_caching=False)
    return llm.generate([prompts["target"]], GREEDY)[0].outputs[0].token_ids


def _evict_then_ask_again(llm: LLM, prompts) -> list[int]:
    llm.generate([prompts["target"]], GREEDY)
    for filler in prompts["fillers"]:  # each needs most of the 23-block pool
        llm.generate([filler], GREEDY)
    return llm.generate([prompts["target"]], GREEDY)[0].outputs[0].token_ids


def test_evicted_prefix_comes_back_from_cpu(tiny_models, prompts, reference):
    llm = make(tiny_models["llama"], kv_offload_cpu_gib=gib(64))
    assert _evict_then_ask_again(llm, prompts) == reference
    tiers = llm.engine.tiers
    assert tiers.restored_blocks["cpu"] == 9  # 39 usable prompt tokens: 9 full blocks
    assert llm.engine.kv_manager.pool.num_free == llm.engine.kv_manager.pool.capacity
    assert tiers.num_cpu_cached <= tiers.num_cpu_blocks


def test_prefix_evicted_through_cpu_comes_back_from_disk_and_after_a_restart(tiny_models, prompts, reference, tmp_path):
    settings = dict(kv_offload_cpu_gib=gib(2), kv_offload_disk_gib=gib(200), kv_offload_disk_path=str(tmp_path))
    llm = make(tiny_models["llama"], **settings)
    assert _evict_then_ask_again(llm, prompts) == reference
    assert llm.engine.tiers.restored_blocks["disk"] > 0
    assert len(llm.engine.tiers.disk) <= llm.engine.tiers.disk.capacity_blocks

    restarted = make(tiny_models["llama"], **settings)
    assert restarted.generate([prompts["target"]], GREEDY)[0].outputs[0].token_ids == reference
    assert restarted.engine.tiers.restored_blocks["disk"] == 9


def test_truncated_disk_file_is_ignored_and_recomputed(tiny_models, prompts, reference, tmp_path):
    settings = dict(kv_offload_disk_gib=gib(200), kv_offload_disk_path=str(tmp_path))
    _evict_then_ask_again(make(tiny_models["llama"], **settings), prompts)
    for f in tmp_path.glob("*.kvblock"):
        f.write_bytes(f.read_bytes()[:100])

    restarted = make(tiny_models["llama"], **settings)
    assert restarted.generate([prompts["target"]], GREEDY)[0].outputs[0].token_ids == reference
    assert restarted.engine.tiers.restored_blocks["disk"] == 0
    assert restarted.engine.tiers.disk.num_failures >= 1


def test_foreign_model_blocks_are_never_used(tiny_models, prompts, tmp_path):
    settings = dict(kv_offload_disk_gib=gib(400), kv_offload_disk_path=str(tmp_path))
    _evict_then_ask_again(make(tiny_models["llama"], **settings), prompts)
    written = len(list(tmp_path.glob("*.kvblock")))
    assert written > 0

    other = LLM(str(tiny_models["mistral"]), dtype="float64", max_model_len=64, block_size=BLOCK, **settings)
    expected = LLM(str(tiny_models["mistral"]), dtype="float64", max_model_len=64).generate([prompts["target"]], GREEDY)
    assert other.generate([prompts["target"]], GREEDY)[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert other.engine.tiers.restored_blocks["disk"] == 0
    assert other.engine.tiers.disk.num_failures >= 1


def test_preempted_sequences_resume_from_the_cpu_tier(tiny_models):
    g = torch.Generator().manual_seed(9)
    batch = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (30, 25, 20, 28, 33, 18)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(str(tiny_models["llama"]), dtype="float64", max_model_len=64, enable_prefix_caching=False)
    swapping = make(tiny_models["llama"], kv_offload_cpu_gib=gib(128))

    outputs = swapping.generate(batch, params)

    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain.generate(batch, params)]
    assert swapping.engine.scheduler.num_preemptions > 0
    assert swapping.engine.tiers.restored_blocks["cpu"] > 0
    assert swapping.engine.kv_manager.pool.num_free == swapping.engine.kv_manager.pool.capacity


def test_offload_settings_are_validated(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="kv_offload_disk_path"):
        make(tiny_models["llama"], kv_offload_disk_gib=1.0)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        make(tiny_models["llama"], kv_offload_cpu_gib=1.0, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make(tiny_models["llama"], kv_offload_cpu_gib=1.0, tensor_parallel_size=2)
