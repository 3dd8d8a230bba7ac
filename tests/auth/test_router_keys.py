"""A router with API keys in front of workers that take only the router's internal token."""

from __future__ import annotations

import httpx
import openai
import pytest

from kvflock.router.app import RouterOptions
from kvflock.shared.auth import AccessPolicy
from tests.auth.conftest import INTERNAL_TOKEN, OTHER_SERVICE_KEY, USER_KEY, client, keys
from tests.auth.test_worker_keys import assert_authentication_error

PROMPT = [5, 17, 42, 99, 3, 250, 8]
ROUTER_ACCESS = AccessPolicy(api_keys=keys(USER_KEY))
BEHIND_ROUTER = AccessPolicy(api_keys=keys(INTERNAL_TOKEN))


@pytest.fixture
def service(start_worker, start_router) -> tuple[str, str]:
    """(router URL, worker URL): the worker requires the internal token, the router user keys."""
    worker = start_worker(BEHIND_ROUTER, model="tiny_llama")
    router = start_router([worker], RouterOptions(access=ROUTER_ACCESS, internal_token=INTERNAL_TOKEN.encode(),
                                                  poll_interval=0.2))
    return router, worker


def test_the_router_serves_a_right_key_streaming_and_not(service):
    router, _ = service
    answer = client(router, USER_KEY).completions.create(model="tiny_llama", prompt=PROMPT, max_tokens=4)
    assert answer.usage.completion_tokens == 4
    chunks = list(client(router, USER_KEY).completions.create(model="tiny_llama", prompt=PROMPT, max_tokens=4,
                                                              stream=True))
    assert any(c.choices for c in chunks)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"},
                                     {"Authorization": f"Bearer {OTHER_SERVICE_KEY}"},
                                     {"Authorization": f"Bearer {INTERNAL_TOKEN}"}],
                         ids=["no key", "wrong key", "another service's key", "the internal token"])
def test_the_router_refuses_anything_but_a_user_key_with_401(service, headers):
    router, _ = service
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
        response = httpx.request(method, f"{router}{path}", headers=headers,
                                 json={"model": "tiny_llama", "prompt": PROMPT, "max_tokens": 2})
        assert_authentication_error(response)


def test_the_routers_models_are_read_from_the_workers_with_its_internal_token(service):
    router, _ = service
    assert [m.id for m in client(router, USER_KEY).models.list().data] == ["tiny_llama"]


def test_the_router_probes_answer_without_a_key(service):
    router, _ = service
    assert httpx.get(f"{router}/health").status_code == 200
    assert httpx.get(f"{router}/ready").status_code == 200


def test_a_worker_reached_directly_refuses_a_user_key(service):
    _, worker = service
    with pytest.raises(openai.AuthenticationError):
        client(worker, USER_KEY).completions.create(model="tiny_llama", prompt=PROMPT, max_tokens=2)
    assert httpx.get(f"{worker}/ready").status_code == 200, "the kubelet and the router's poller still read it"


def test_a_router_without_the_internal_token_is_refused_by_the_workers(start_worker, start_router):
    worker = start_worker(BEHIND_ROUTER, model="tiny_llama")
    router = start_router([worker], RouterOptions(access=ROUTER_ACCESS, poll_interval=0.2))
    response = httpx.post(f"{router}/v1/completions", headers={"Authorization": f"Bearer {USER_KEY}"},
                          json={"model": "tiny_llama", "prompt": PROMPT, "max_tokens": 2})
    assert_authentication_error(response)
