"""vLLM/OpenAI API parity of the worker, against a real uvicorn server with the `openai` client and
httpx: logit_bias steers greedy output, echo puts the prompt before the answer, best_of == n,
/tokenize and /detokenize round-trip (and count what usage counts), /version, chat_template_kwargs
and continue_final_message reach the template, a model served under several names answers to each,
vLLM's gauges are exported, and every field the worker refuses gets a 400 naming it."""

import httpx
import openai
import pytest

import kvflock
from kvflock.shared.metrics import parse_samples
from kvflock.worker.api_fields import HONOURED, REFUSED
from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.config import EngineConfig
from kvflock.worker.engine import LLMEngine
from kvflock.worker.protocol import ChatCompletionRequest, CompletionRequest
from kvflock.worker.server import WorkerState, create_app
from tests.server.conftest import MODEL, free_port, running_server

pytestmark = pytest.mark.slow
ALIAS = "smollm2-alias"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
REQUIRED = {"completions": {"prompt": "Hi", "max_tokens": 2}, "chat": {"messages": MESSAGES, "max_tokens": 2}}


@pytest.fixture(scope="module")
def url(smollm2):
    state = WorkerState(served_model_name=MODEL, aliases=(ALIAS,))
    state.set_engine(AsyncEngine(LLMEngine(EngineConfig(model="demo", max_model_len=512), loaded=smollm2)))
    with running_server(create_app(state), free_port()) as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def tokens(url: str, text: str) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"prompt": text}).json()["tokens"]


def test_a_plus_100_logit_bias_makes_its_token_the_greedy_output(url):
    api = client(url)
    plain = api.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0).choices[0].text
    [banana] = tokens(url, " banana")
    biased = api.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0,
                                    logit_bias={str(banana): 100}).choices[0].text
    assert biased == " banana" * 3 != plain


def test_a_minus_100_logit_bias_bans_its_token(url):
    api = client(url)
    plain = api.completions.create(model=MODEL, prompt="The sky is", max_tokens=1, temperature=0).choices[0].text
    [first] = tokens(url, plain)
    banned = api.completions.create(model=MODEL, prompt="The sky is", max_tokens=1, temperature=0,
                                    logit_bias={str(first): -100}).choices[0].text
    assert banned != plain


@pytest.mark.parametrize("bias,param", [({"5": 101}, "logit_bias"), ({"99999999": 1}, "logit_bias"),
                                        ({"x": 1}, "logit_bias.x")])
def test_a_bad_logit_bias_is_a_400_naming_it(url, bias, param):
    response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "logit_bias": bias})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_echo_puts_the_prompt_before_the_answer_streamed_or_not(url):
    api = client(url)
    plain = api.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0).choices[0].text
    echoed = api.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, echo=True)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, echo=True, stream=True))
    assert echoed.choices[0].text == streamed == "The sky is" + plain


def test_echo_with_logprobs_is_a_400_naming_echo(url):
    body = {"model": MODEL, "prompt": "Hi", "echo": True, "logprobs": 1}
    response = httpx.post(f"{url}/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "echo"


def test_best_of_equal_to_n_is_honoured_and_otherwise_refused(url):
    ok = client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2, best_of=2, temperature=1, seed=1)
    assert len(ok.choices) == 2
    response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "n": 1, "best_of": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "best_of"


def test_tokenize_and_detokenize_round_trip_and_count_what_usage_counts(url):
    tokens = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "Hello kvflock"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello kvflock"}
    chat = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    answer = client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens


def test_detokenize_refuses_ids_outside_the_vocabulary(url):
    response = httpx.post(f"{url}/detokenize", json={"tokens": [1, -5]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"


def test_chat_template_kwargs_and_continue_final_message_reach_the_template(url):
    template = "{{ greeting }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}],
            "chat_template": template, "chat_template_kwargs": {"greeting": "Ahoy"},
            "add_generation_prompt": False, "continue_final_message": True}
    tokens = httpx.post(f"{url}/tokenize", json=body).json()["tokens"]
    prompt = httpx.post(f"{url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert prompt == "Ahoy[user]Hi[assistant]Hello, I am"
    answer = client(url).chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=3,
                                                 extra_body={"add_generation_prompt": False,
                                                             "continue_final_message": True})
    assert answer.usage.prompt_tokens < httpx.post(f"{url}/tokenize", json={"messages": body["messages"]}).json()["count"]


def test_reserved_template_kwargs_are_a_400_naming_the_field(url):
    body = {"model": MODEL, "messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "chat_template_kwargs"


def test_version_is_the_packages(url):
    assert httpx.get(f"{url}/version").json() == {"version": kvflock.__version__}


def test_every_served_name_is_listed_and_answers(url):
    api = client(url)
    assert [m.id for m in api.models.list().data] == [MODEL, ALIAS]
    answer = api.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=2)
    assert answer.model == ALIAS
    assert httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "Hi"}).status_code == 404


def test_vllm_gauges_are_exported_in_range(url):
    samples = parse_samples(httpx.get(f"{url}/metrics").text)
    assert 0.0 <= samples["vllm:kv_cache_usage_perc"] <= 1.0
    assert samples["vllm:gpu_cache_usage_perc"] == samples["vllm:kv_cache_usage_perc"]
    assert samples["vllm:num_requests_running"] == samples["kvflock_requests_running"] >= 0
    assert samples["vllm:num_requests_waiting"] == samples["kvflock_requests_waiting"] >= 0
    assert 'model_name="smollm2"' in httpx.get(f"{url}/metrics").text


@pytest.mark.parametrize("field", REFUSED, ids=lambda f: f.name)
def test_each_refused_field_is_a_400_naming_it(url, field):
    for endpoint in field.endpoints:
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        body = {"model": MODEL, **REQUIRED[endpoint], field.name: field.refused_example}
        response = httpx.post(url + path, json=body)
        assert response.status_code == 400, (endpoint, response.text)
        error = response.json()["error"]
        assert error["param"] == field.name and field.name in error["message"]


def test_refused_fields_that_ask_for_nothing_and_unknown_fields_are_accepted(url):
    body = {"model": MODEL, **REQUIRED["chat"], "store": False, "modalities": ["text"], "priority": 0,
            "some_future_field": {"x": 1}}
    assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200


def test_every_honoured_field_is_a_request_field():
    for model, endpoint in [(CompletionRequest, "completions"), (ChatCompletionRequest, "chat")]:
        assert HONOURED[endpoint] <= set(model.model_fields), endpoint
        assert not {f.name for f in REFUSED if endpoint in f.endpoints} & set(model.model_fields)
