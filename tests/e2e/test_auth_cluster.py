"""The local cluster with access control: `kvflock up --apply examples/smollm2-auth.yaml` as a
user runs it, then the openai client with the right key, without one, with a wrong one, and
straight at a worker (bypassing the router); no pod's log holds the key."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import kubernetes.client
import openai
import pytest

from kvflock.local.localcluster import StateDir
from kvflock.local.up import apply, ask, key_hint, wait_ready

from .conftest import REPO, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

EXAMPLE = REPO / "examples" / "smollm2-auth.yaml"
SERVICE, MODEL = "smollm2-auth", "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def served(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """The example applied as `kvflock up --apply` does (its Secret made with a random key), Ready."""
    configuration = kubernetes.client.Configuration()
    configuration.host = StateDir(cluster.state_dir).read_info()["api"]  # type: ignore[index]
    with kubernetes.client.ApiClient(configuration) as api_client:
        assert apply(api_client, EXAMPLE) == [f"default/{SERVICE}"]
        service = wait_ready(api_client, "default", SERVICE, timeout=180)
    yield service


def _key(cluster: Cluster) -> str:
    """The key as the printed hint reads it: kubectl, jsonpath, base64 -d."""
    encoded = cluster.kubectl("get", "secret", "smollm2-keys", "-o", "jsonpath={.data.keys}")
    return base64.b64decode(encoded).decode().splitlines()[0]


def _client(served: dict[str, Any], key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served['status']['url']}/v1", api_key=key, max_retries=0, timeout=60)


def _chat(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=8, temperature=0)
    return reply.choices[0].message.content or ""


def test_right_key_works_streaming_and_not(cluster: Cluster, served: dict[str, Any]) -> None:
    client = _client(served, _key(cluster))
    assert _chat(client)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert ask(served["status"]["url"], MODEL, "Say hi.", key=_key(cluster))  # what `kvflock up --ask` sends


@pytest.mark.parametrize("key", [None, "sk-wrong-key"])
def test_missing_or_wrong_key_gets_401_with_the_error_body(served: dict[str, Any], key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{served['status']['url']}/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        _chat(_client(served, key or "sk-another-service-key"))


def test_worker_reached_directly_refuses_the_user_key(cluster: Cluster, served: dict[str, Any]) -> None:
    (worker,) = cluster.workers(SERVICE)
    endpoint = worker["metadata"]["annotations"]["kvflock.dev/endpoint"]
    user = {"Authorization": f"Bearer {_key(cluster)}"}
    assert httpx.get(f"{endpoint}/health", timeout=10).status_code == 200  # the kubelet's probes stay open
    refused = httpx.post(f"{endpoint}/v1/chat/completions", headers=user, timeout=30,
                         json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{endpoint}/admin/drain", headers=user, timeout=10).status_code == 401


def test_hint_says_how_to_pass_the_key_and_no_log_holds_it(cluster: Cluster, served: dict[str, Any]) -> None:
    hint = key_hint(cluster.kubeconfig, "default", served, served["status"]["url"])
    assert "kubectl get secret smollm2-keys" in hint and "OPENAI_API_KEY" in hint
    key = _key(cluster)
    assert key not in hint
    logs = [*(cluster.state_dir / "logs").glob("*.log"), cluster.state_dir / "up.log"]
    assert any("smollm2-auth-w-0" in path.name for path in logs)
    for path in logs:
        assert key not in path.read_text(errors="replace"), path.name
