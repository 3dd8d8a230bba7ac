"""LoRA adapters over the OpenAI API, against a real uvicorn worker with keys on: an adapter is
a model name (listed in /v1/models with the base as parent), loaded and unloaded at run time
with the admin token only, an unknown name keeps its 404 naming `model`, and /metrics counts
requests per adapter."""

import httpx
import openai
import pytest

from kvflock.shared.auth import AccessPolicy
from kvflock.shared.metrics import parse_lora_adapters
from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import EngineConfig
from kvflock.worker.engine import LLMEngine
from kvflock.worker.server import WorkerState, create_app
from tests.lora_adapters import write_adapter
from tests.polling import wait_for
from tests.server.conftest import free_port, running_server

USER_KEY, ADMIN_TOKEN = "sk-lora-user-1", "lora-admin-2"
BASE = "tiny"
PROMPT = "The capital of France is"


@pytest.fixture
def worker(smollm2, smollm2_hf, tmp_path):
    adapters = {name: write_adapter(tmp_path / name, smollm2_hf, 8, 16, seed=seed, std=0.5)
                for name, seed in (("a", 1), ("b", 2))}
    engine = LLMEngine(EngineConfig(model="demo", max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=8),
                       loaded=smollm2)
    engine.load_lora("a", str(adapters["a"]))
    state = WorkerState(served_model_name=BASE)
    state.set_engine(AsyncEngine(engine))
    access = AccessPolicy(api_keys=(USER_KEY.encode(),), admin_tokens=(ADMIN_TOKEN.encode(),))
    with running_server(create_app(state, access=access), free_port()) as url:
        yield url, adapters


def complete(url: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, timeout=60)
    answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    return answer.choices[0].text


def admin(url: str, path: str, body: dict, token: str = ADMIN_TOKEN) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def test_adapter_is_a_model_listed_with_its_parent(worker):
    url, adapters = worker
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "a"}
    assert models["a"].model_extra["parent"] == BASE and models["a"].model_extra["root"] == str(adapters["a"])
    assert complete(url, "a") != complete(url, BASE)
    assert complete(url, "a") == complete(url, "a")


def test_load_and_unload_at_run_time(worker):
    url, adapters = worker
    assert admin(url, "load_lora_adapter", {"lora_name": "b", "lora_path": str(adapters["b"])}).status_code == 200
    # /metrics names the adapters served (the router and the operator read them there)
    wait_for(lambda: parse_lora_adapters(httpx.get(f"{url}/metrics").text) == {name: str(path) for name, path in
                                                                             adapters.items()}, what="b in /metrics")
    with_b = complete(url, "b")
    assert with_b not in (complete(url, "a"), complete(url, BASE))
    assert admin(url, "unload_lora_adapter", {"lora_name": "b"}).status_code == 200
    with pytest.raises(openai.NotFoundError) as refused:
        complete(url, "b")
    assert refused.value.body["param"] == "model" and "'b' is not served here" in refused.value.body["message"]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'kvflock_lora_requests_total{lora_name="b"} 1.0' in metrics
    assert "kvflock_lora_adapters_registered 1.0" in metrics
    wait_for(lambda: set(parse_lora_adapters(httpx.get(f"{url}/metrics").text) or ()) == {"a"},
             what="b gone from /metrics")


def test_adapter_endpoints_need_the_admin_token(worker):
    url, adapters = worker
    body = {"lora_name": "b", "lora_path": str(adapters["b"])}
    assert admin(url, "load_lora_adapter", body, token=USER_KEY).status_code in (401, 403)
    assert admin(url, "unload_lora_adapter", {"lora_name": "a"}, token=USER_KEY).status_code in (401, 403)
    assert admin(url, "unload_lora_adapter", {"lora_name": "a"}, token="wrong").status_code in (401, 403)


def test_bad_adapter_requests_name_the_field(worker, tmp_path):
    url, _ = worker
    bad_path = admin(url, "load_lora_adapter", {"lora_name": "c", "lora_path": str(tmp_path / "missing")})
    assert bad_path.status_code == 400 and bad_path.json()["error"]["param"] == "lora_path"
    clash = admin(url, "load_lora_adapter", {"lora_name": BASE, "lora_path": str(tmp_path)})
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "lora_name"
    unknown = admin(url, "unload_lora_adapter", {"lora_name": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "lora_name"
    missing = admin(url, "load_lora_adapter", {"lora_name": "c"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
