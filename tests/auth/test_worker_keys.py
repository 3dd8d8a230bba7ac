"""A worker with API keys: the OpenAI client with a right key is served, anything else gets 401."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from kvflock.shared.auth import AccessPolicy
from tests.auth.conftest import ADMIN_TOKEN, OTHER_SERVICE_KEY, SECOND_USER_KEY, USER_KEY, client, keys

POLICY = AccessPolicy(api_keys=keys(USER_KEY, SECOND_USER_KEY), admin_tokens=keys(ADMIN_TOKEN))
CHAT = [{"role": "user", "content": "Say hi."}]


def assert_authentication_error(response: httpx.Response) -> None:
    assert response.status_code == 401
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["param"] is None and body["error"]["code"] is None


@pytest.mark.parametrize("key", [USER_KEY, SECOND_USER_KEY])
def test_a_right_key_is_served_without_streaming(start_worker, key):
    url = start_worker(POLICY)
    answer = client(url, key).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4)
    assert answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0


def test_a_right_key_is_served_streaming(start_worker):
    url = start_worker(POLICY)
    chunks = list(client(url, USER_KEY).completions.create(model="smollm2", prompt="Hello", max_tokens=4,
                                                           stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer sk-wrong"},
    {"Authorization": f"Bearer {OTHER_SERVICE_KEY}"},
    {"Authorization": f"Basic {USER_KEY}"},
    {"Authorization": f"Bearer {ADMIN_TOKEN}"},
], ids=["no key", "wrong key", "another service's key", "not a bearer", "the admin token"])
def test_without_a_right_key_v1_is_refused_with_401(start_worker, headers):
    url = start_worker(POLICY)
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        method = "GET" if path == "/v1/models" else "POST"
        response = httpx.request(method, f"{url}{path}", headers=headers,
                                 json={"model": "smollm2", "prompt": "x", "messages": CHAT})
        assert_authentication_error(response)
        assert response.headers["www-authenticate"] == "Bearer"
        assert USER_KEY not in response.text and OTHER_SERVICE_KEY not in response.text


def test_the_openai_client_with_a_wrong_key_raises_authentication_error(start_worker):
    url = start_worker(POLICY)
    with pytest.raises(openai.AuthenticationError) as raised:
        client(url, OTHER_SERVICE_KEY).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4)
    assert raised.value.status_code == 401


def test_health_and_ready_answer_without_a_key(start_worker):
    url = start_worker(POLICY)
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").status_code == 200


def test_admin_drain_refuses_a_user_key_and_takes_the_admin_token(start_worker):
    url = start_worker(POLICY)
    for headers in ({}, {"Authorization": f"Bearer {USER_KEY}"}):
        assert_authentication_error(httpx.post(f"{url}/admin/drain", headers=headers))
        assert_authentication_error(httpx.get(f"{url}/admin/drain", headers=headers))
    assert httpx.get(f"{url}/ready").status_code == 200, "a refused drain must not drain"
    drained = httpx.post(f"{url}/admin/drain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert drained.status_code == 200 and drained.json()["draining"] is True


def test_without_key_files_the_worker_is_open_as_before(start_worker):
    url = start_worker(AccessPolicy())
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert httpx.get(f"{url}/admin/drain").status_code == 200


def test_metrics_can_leave_the_serving_port(start_worker):
    url = start_worker(POLICY, serve_metrics=False)
    assert httpx.get(f"{url}/metrics").status_code == 404
    assert httpx.get(f"{start_worker(POLICY)}/metrics").status_code == 200


def test_no_key_reaches_the_logs(start_worker, caplog):
    caplog.set_level(logging.DEBUG)
    url = start_worker(POLICY)
    client(url, USER_KEY).completions.create(model="smollm2", prompt="Hello", max_tokens=2)
    list(client(url, USER_KEY).completions.create(model="smollm2", prompt="Hello", max_tokens=2, stream=True))
    for key in ("sk-wrong-key-for-logs", OTHER_SERVICE_KEY, ADMIN_TOKEN):
        with pytest.raises(openai.AuthenticationError):
            client(url, key).completions.create(model="smollm2", prompt="Hello", max_tokens=2)
    httpx.post(f"{url}/admin/drain", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert caplog.records, "the test must see the server's and the client's logs"
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for key in (USER_KEY, "sk-wrong-key-for-logs", OTHER_SERVICE_KEY, ADMIN_TOKEN):
        assert key not in logged


def test_admin_is_closed_when_keys_are_on_but_no_admin_token_is(start_worker):
    url = start_worker(AccessPolicy(api_keys=keys(USER_KEY)))
    for headers in ({}, {"Authorization": f"Bearer {USER_KEY}"}, {"Authorization": "Bearer anything"}):
        refused = httpx.post(f"{url}/admin/drain", headers=headers)
        assert refused.status_code == 403
        assert refused.json()["error"]["type"] == "permission_error"
        assert "--admin-token-file" in refused.json()["error"]["message"]
    assert httpx.get(f"{url}/ready").status_code == 200, "a refused drain must not drain"


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/no-such-path"])
def test_with_keys_on_every_path_but_probes_and_metrics_needs_a_key(start_worker, path):
    url = start_worker(POLICY)
    assert_authentication_error(httpx.get(f"{url}{path}"))
    assert httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {USER_KEY}"}).status_code != 401
    assert httpx.get(f"{url}/metrics").status_code == 200
