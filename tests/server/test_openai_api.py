"""The worker's OpenAI API, called with the real `openai` client and httpx against a real
uvicorn server: answers equal the offline engine's, streaming or not, one at a time or 32
concurrent; a client that leaves frees its blocks; drain stops new work, not old."""

import asyncio
import threading

import httpx
import openai
import pytest

from kvflock.worker.config import EngineConfig, SamplingParams
from kvflock.worker.engine import LLMEngine
from kvflock.worker.llm import LLM
from tests.server.conftest import MODEL, metric

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(smollm2) -> LLM:
    return LLM.from_engine(LLMEngine(EngineConfig(model="demo", max_model_len=512), loaded=smollm2))


def test_chat_matches_the_offline_engine_streaming_or_not(serve, offline):
    url = serve()
    [expected] = offline.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24))
    api = client(url)

    full = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    chunks = list(api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24,
                                              stream=True, stream_options={"include_usage": True}))

    assert full.choices[0].message.content == expected.outputs[0].text
    assert "Paris" in full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert full.usage.completion_tokens == len(expected.outputs[0].token_ids)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected.outputs[0].text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_match_the_offline_engine_streaming_or_not(serve, offline):
    url = serve()
    prompt = "The three primary colors are"
    [expected] = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))
    api = client(url)

    full = api.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, logprobs=2)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True))

    assert full.choices[0].text == streamed == expected.outputs[0].text
    assert full.choices[0].finish_reason == "length"
    assert len(full.choices[0].logprobs.tokens) == 16
    assert all(len(top) == 2 for top in full.choices[0].logprobs.top_logprobs)


def test_n_and_seed_give_reproducible_distinct_choices(serve):
    api = client(serve())
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, n=3, temperature=1.0, seed=11)
    first = [c.text for c in api.completions.create(**kwargs).choices]
    second = [c.text for c in api.completions.create(**kwargs).choices]
    assert first == second and len(set(first)) == 3


def test_32_concurrent_streams_equal_the_same_requests_one_at_a_time(serve):
    url = serve(max_num_seqs=32)
    questions = [f"Name {i + 1} fruits." if i % 2 else f"Count from {i} to {i + 5}." for i in range(32)]

    async def ask(api: openai.AsyncOpenAI, q: str) -> str:
        stream = await api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                   temperature=0, max_tokens=12, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run_all() -> list[str]:
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(ask(api, q) for q in questions))

    concurrent = asyncio.run(run_all())
    api = client(url)
    one_by_one = [api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                              temperature=0, max_tokens=12).choices[0].message.content
                  for q in questions]
    assert concurrent == one_by_one
    assert metric(url, "kvflock_kv_blocks_used") == 0


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(serve):
    url = serve()
    body = {"model": MODEL, "prompt": "Write a long story about a dragon.", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        assert metric(url, "kvflock_kv_blocks_used") > 0
    for _ in range(200):
        if metric(url, "kvflock_kv_blocks_used") == 0 and metric(url, "kvflock_requests_running") == 0:
            break
        threading.Event().wait(0.05)
    assert metric(url, "kvflock_kv_blocks_used") == 0
    assert metric(url, "kvflock_requests_running") == 0


def test_probes_models_and_metrics(serve):
    url = serve()
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").json() == {"ready": True}
    assert [m.id for m in client(url).models.list().data] == [MODEL]
    client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert metric(url, "kvflock_generation_tokens_total") >= 3
    assert metric(url, "kvflock_time_to_first_token_seconds_count") >= 1
    assert metric(url, "kvflock_kv_blocks_total") > 0


def test_a_repeated_prefix_shows_as_prefix_cache_hits(serve):
    url = serve()
    api = client(url)
    long_system = "You are a careful assistant who answers in one short sentence. " * 4
    for question in ("What is the capital of France?", "What is the capital of Italy?"):
        api.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "system", "content": long_system}, {"role": "user", "content": question}])
    assert metric(url, "kvflock_prefix_cache_hits_total") >= 48
    assert metric(url, "kvflock_prefix_cache_queries_total") > metric(url, "kvflock_prefix_cache_hits_total")


def test_drain_refuses_new_requests_and_finishes_those_in_flight(serve):
    url = serve()
    body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        status = httpx.post(f"{url}/admin/drain").json()
        assert status["draining"] and status["in_flight"] == 1 and not status["drained"]

        refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert httpx.get(f"{url}/ready").status_code == 503

        rest = list(lines)
    assert rest[-1] == "data: [DONE]" or "data: [DONE]" in rest
    assert httpx.get(f"{url}/admin/drain").json()["drained"] is True
