"""spec.auth under the real operator (kopf against the API server on 127.0.0.1): the Secrets are
mounted as files, a new key in the user's Secret rolls the pods, a missing Secret is reported,
and no key value appears in any object, Event, status or log line the operator produced."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import kubernetes.client
import pytest
from kvflock.operator import credentials

from .conftest import FakeWorkers, wait_for
from .test_operator import GROUP, MERGE, NS, PLURAL, VERSION, Cluster, operator  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(60)

FIRST_KEY, SECOND_KEY = "sk-first-5d41402abc4b2a76b9719d91", "sk-second-7d793037a0760186574b0282"
AUTH_SPEC = {"replicas": 1, "resources": {"gpusPerReplica": 0}, "drainTimeoutSeconds": 10,
             "auth": {"apiKeySecretRef": {"name": "chat-keys", "key": "keys"}}}


@pytest.fixture
def cluster(operator: None, api_client: kubernetes.client.ApiClient, fake_workers: FakeWorkers) -> Cluster:
    return Cluster(api_client, fake_workers)


def put_secret(cluster: Cluster, name: str, value: str) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"keys": base64.b64encode(value.encode()).decode()}}
    try:
        cluster.core.create_namespaced_secret(NS, body)
    except kubernetes.client.ApiException as exc:
        assert exc.status == 409
        cluster.core.patch_namespaced_secret(name, NS, {"data": body["data"]}, _content_type=MERGE)


def auth_hashes(cluster: Cluster, name: str) -> dict[str, str]:
    return {n: (p.metadata.annotations or {}).get("kvflock.dev/auth-hash", "") for n, p in cluster.pods(name).items()}


def everything(cluster: Cluster) -> str:
    """Every object the operator wrote, and the service with its status, as one text."""
    client = cluster.core.api_client
    objects: list[Any] = [
        cluster.core.list_namespaced_pod(NS).items, cluster.core.list_namespaced_service(NS).items,
        cluster.core.list_namespaced_config_map(NS).items, cluster.core.list_namespaced_event(NS).items,
        cluster.custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL),
    ]
    return json.dumps(client.sanitize_for_serialization(objects))


def test_secret_is_mounted_a_new_key_rolls_the_pods_and_no_key_is_shown(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    put_secret(cluster, "chat-keys", FIRST_KEY)
    cluster.create("chat", AUTH_SPEC)
    pods = wait_for(lambda: cluster.pods("chat") or None, what="a worker pod")
    (pod,) = pods.values()
    volumes = {v.name: v.secret.secret_name for v in pod.spec.volumes if v.secret}
    assert volumes == {"api-keys": "chat-keys", "internal-tokens": "chat-internal"}
    command = pod.spec.containers[0].command
    assert "--internal-token-file" in command and "--admin-token-file" in command
    internal = cluster.core.read_namespaced_secret("chat-internal", NS)
    assert internal.metadata.owner_references[0].name == "chat"
    admin_token = base64.b64decode(internal.data["admin-token"]).decode()
    first_hash = auth_hashes(cluster, "chat")["chat-w-0"]
    assert first_hash

    cluster.run_pods("chat")
    put_secret(cluster, "chat-keys", SECOND_KEY)  # same Secret, same key, new value
    rolled = wait_for(lambda: len(set(auth_hashes(cluster, "chat").values()) - {first_hash}) == 1
                      and auth_hashes(cluster, "chat"), what="a worker with the new key")
    assert rolled["chat-w-1"] not in ("", first_hash)
    wait_for(lambda: cluster.run_pods("chat") and "chat-w-0" not in cluster.pods("chat"),
             what="the worker with the old key drained and removed")
    assert cluster.workers.drained == ["chat-w-0"]
    assert cluster.workers.drain_authorization == [f"Bearer {admin_token}"]

    assert "Handler 'secret_changed' succeeded" in caplog.text  # the Secret's watch, not only the timer
    shown = everything(cluster) + caplog.text
    for key in (FIRST_KEY, SECOND_KEY, base64.b64encode(FIRST_KEY.encode()).decode()):
        assert key not in shown


def test_missing_secret_is_degraded_with_an_event_and_its_creation_starts_the_pods(cluster: Cluster) -> None:
    cluster.create("chat", {**AUTH_SPEC, "auth": {"apiKeySecretRef": {"name": "late-keys", "key": "keys"}}})
    degraded = wait_for(lambda: cluster.condition("chat", "Degraded").get("reason") == "AuthSecretMissing"
                        and cluster.condition("chat", "Degraded"), what="Degraded: AuthSecretMissing")
    assert "Secret default/late-keys not found" in degraded["message"]
    wait_for(lambda: any("late-keys" in m for m in cluster.events("AuthSecretMissing")), what="the Event")
    assert cluster.pods("chat") == {}

    put_secret(cluster, "late-keys", FIRST_KEY)
    wait_for(lambda: len(cluster.pods("chat")) == 1, what="the worker, once the Secret exists")
    wait_for(lambda: cluster.condition("chat", "Degraded").get("reason") != "AuthSecretMissing",
             what="Degraded cleared")
    assert FIRST_KEY not in everything(cluster)


def test_auth_hash_is_keyed_by_the_service_so_equal_keys_hash_differently() -> None:
    one, other = credentials.new_tokens(), credentials.new_tokens()
    as_bytes = [{k: v.encode() for k, v in tokens.items()} for tokens in (one, other)]
    assert credentials.auth_hash(b"k", as_bytes[0]) != credentials.auth_hash(b"k", as_bytes[1])
