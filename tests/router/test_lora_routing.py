"""LoRA adapters through a real router over real workers: the router learns from the workers'
/v1/models which one serves which adapter, sends each adapter's requests there, lists every
adapter in its own /v1/models, and an unknown name still gets the workers' 404."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from tests.lora_adapters import write_adapter
from tests.polling import wait_for

from .conftest import MODEL, client

PROMPT = [5, 17, 42, 99, 7, 3, 120, 64, 8, 33, 71, 2, 19, 250, 11, 6]


@pytest.fixture
def adapter(tiny_models, tmp_path):
    with torch.device("meta"):  # its projections' shapes are all an adapter needs
        model = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_models["llama"]))
    return write_adapter(tmp_path / "sql", model, rank=8, alpha=16, seed=3, std=1.0)


def _load(url: str, name: str, path) -> None:
    answer = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=60)
    assert answer.status_code == 200, answer.text


def _complete(url: str, model: str) -> tuple[str, list[float]]:
    """The greedy answer: its text and its tokens' logprobs (the tiny model's text may be empty)."""
    reply = client(url).completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                           extra_body={"ignore_eos": True})
    return reply.choices[0].text, reply.choices[0].logprobs.token_logprobs


@pytest.mark.parametrize("policy", ["prefix-aware", "round-robin"])
def test_adapter_requests_go_to_the_worker_that_serves_it(start_worker, start_router, adapter, policy):
    lora = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}
    # The workers' engines share one model load, which only the newest one's adapter hooks stay on.
    other, holder = start_worker(**lora), start_worker(**lora)
    _load(holder.url, "sql", adapter)
    router = start_router([holder.url, other.url], policy=policy)
    wait_for(lambda: "sql" in {m.id for m in client(router).models.list().data}, what="the router to list sql")

    expected = _complete(holder.url, "sql")
    # The other worker has no `sql` and would answer 404: every request lands on the holder.
    assert all(_complete(router, "sql") == expected for _ in range(6))
    assert _complete(router, MODEL) != expected


def test_the_routers_models_are_every_workers_models_each_once(start_worker, start_router, adapter):
    lora = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}
    first, second = start_worker(**lora), start_worker(**lora)
    _load(first.url, "sql", adapter)
    _load(second.url, "sql-v2", adapter)
    router = start_router([first.url, second.url])
    wait_for(lambda: len(client(router).models.list().data) == 3, what="both workers' models")
    models = {m.id: m for m in client(router).models.list().data}
    assert set(models) == {MODEL, "sql", "sql-v2"}
    assert models["sql"].model_extra["parent"] == MODEL


def test_an_unknown_model_is_refused_with_404_naming_it(start_worker, start_router):
    router = start_router([start_worker(enable_lora=True, max_loras=2, max_lora_rank=8).url])
    with pytest.raises(openai.NotFoundError) as refused:
        _complete(router, "no-such-adapter")
    assert "no-such-adapter" in str(refused.value)
