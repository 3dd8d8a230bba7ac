"""spec.auth in the rendered children: Secrets mounted as files, paths in the flags, never a key;
a new key (or a new Secret reference) rolls the workers; what the operator learns of a Secret."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from typing import Any

import pytest

from kvflock.operator import children, credentials, router_children
from kvflock.operator.children import Owner
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.operator.reconcile import Observed, Plan, WorkerPod, reconcile
from kvflock.shared import names

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")
NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)
# The value the user's Secret holds: no manifest, annotation or message may contain it.
API_KEY = b"sk-kvflock-0123456789abcdef"
AUTH = {"apiKeySecretRef": {"name": "chat-keys", "key": "keys"}}
INTERNAL = {"internal-token": b"internal-0123", "admin-token": b"admin-4567"}


def spec(**fields: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}, **fields})


def run(s: InferenceServiceSpec, pods: list[WorkerPod], auth_hash: str | None = None) -> Plan:
    return reconcile(OWNER, s, Observed(pods=pods, auth_hash=auth_hash), NOW, generation=1)


def worker_manifests(plan: Plan) -> list[dict[str, Any]]:
    return [dict(a.manifest) for a in plan.actions if a.kind == "Pod" and "-w-" in a.name and a.manifest]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_workers_mount_both_secrets_and_get_the_internal_and_admin_token_paths() -> None:
    plan = run(spec(replicas=2, auth=AUTH), [], auth_hash="h1")
    pods = worker_manifests(plan)
    assert len(pods) == 2
    for pod in pods:
        pod_spec = pod["spec"]
        container = pod_spec["containers"][0]
        secrets = {v["name"]: v["secret"] for v in pod_spec["volumes"] if "secret" in v}
        assert secrets == {
            "api-keys": {"secretName": "chat-keys", "items": [{"key": "keys", "path": "api-keys"}]},
            "internal-tokens": {"secretName": "chat-internal"},
        }
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"] if m["name"] in secrets}
        assert mounts == {"api-keys": "/etc/kvflock-auth", "internal-tokens": "/etc/kvflock-internal"}
        command = container["command"]
        assert "--api-key-file" not in command  # behind the router a worker refuses user keys
        assert flag(command, "--internal-token-file") == "/etc/kvflock-internal/internal-token"
        assert flag(command, "--admin-token-file") == "/etc/kvflock-internal/admin-token"
        assert pod["metadata"]["annotations"][names.ANNOTATION_AUTH_HASH] == "h1"
    rendered = json.dumps([a.manifest for a in plan.actions])
    assert API_KEY.decode() not in rendered and "secretKeyRef" not in rendered


def test_router_checks_user_keys_and_shows_workers_the_internal_token() -> None:
    s = spec(auth=AUTH)
    pod = router_children.router_pod(OWNER, s, "h1")
    command = pod["spec"]["containers"][0]["command"]
    assert flag(command, "--api-key-file") == "/etc/kvflock-auth/api-keys"
    assert flag(command, "--internal-token-file") == "/etc/kvflock-internal/internal-token"
    assert "--admin-token-file" not in command
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {"api-keys", "internal-tokens"}


def test_without_auth_no_secret_is_mounted_and_no_key_flag_given() -> None:
    s = spec(replicas=1)
    (pod,) = worker_manifests(run(s, []))
    assert not any("secret" in v for v in pod["spec"]["volumes"])
    command = set(pod["spec"]["containers"][0]["command"])
    assert not {"--api-key-file", "--internal-token-file", "--admin-token-file"} & command
    assert names.ANNOTATION_AUTH_HASH not in pod["metadata"]["annotations"]
    assert children.auth_args(OWNER, s, "router") == []


def test_changed_secret_reference_rolls_the_workers() -> None:
    old = spec(replicas=1, auth=AUTH)
    new = spec(replicas=1, auth={"apiKeySecretRef": {"name": "chat-keys-2", "key": "keys"}})
    hashes = {children.spec_hash(OWNER, s, "h1") for s in (old, new, spec(replicas=1, auth={
        "apiKeySecretRef": {"name": "chat-keys", "key": "rotated"}}))}
    assert len(hashes) == 3
    running = WorkerPod(name="chat-w-0", index=0, spec_hash=children.spec_hash(OWNER, old, "h1"), phase="Running",
                        ready=True)
    assert [a.name for a in run(new, [running], "h1").actions if a.kind == "Pod" and "-w-" in a.name] == ["chat-w-1"]


def test_new_key_in_the_same_secret_rolls_the_workers() -> None:
    s = spec(replicas=1, auth=AUTH)
    running = WorkerPod(name="chat-w-0", index=0, spec_hash=children.spec_hash(OWNER, s, "h1"), phase="Running",
                        ready=True)
    assert [a for a in run(s, [running], "h1").actions if "-w-" in a.name] == []
    (surge,) = worker_manifests(run(s, [running], "h2"))
    assert surge["metadata"]["name"] == "chat-w-1"
    assert surge["metadata"]["annotations"][names.ANNOTATION_AUTH_HASH] == "h2"


def test_auth_hash_follows_the_keys_and_the_internal_tokens_and_reveals_neither() -> None:
    first = credentials.auth_hash(API_KEY, INTERNAL)
    assert first == credentials.auth_hash(API_KEY, dict(INTERNAL))
    assert first != credentials.auth_hash(API_KEY + b"\nsk-second", INTERNAL)
    assert first != credentials.auth_hash(API_KEY, {**INTERNAL, "admin-token": b"other"})
    # Keyed by the internal tokens: a plain hash of a guessed key does not match it.
    assert first not in hashlib.sha256(API_KEY).hexdigest()


def secret(data: dict[str, bytes]) -> dict[str, Any]:
    return {"data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


@pytest.mark.parametrize(("found", "expected"), [
    (None, "Secret ml/chat-keys not found"),
    (secret({"other": API_KEY}), "Secret ml/chat-keys has no key 'keys' (its keys: other)"),
    (secret({"keys": b"  \n"}), "key 'keys' of Secret ml/chat-keys is empty"),
])
def test_missing_secret_or_key_is_a_problem_naming_the_secret_not_its_content(
        found: dict[str, Any] | None, expected: str) -> None:
    state = credentials.auth_state("ml", "chat-keys", "keys", found, INTERNAL)
    assert state.hash is None and state.problem is not None
    assert expected in state.problem and API_KEY.decode() not in state.problem


def test_readable_secret_gives_the_hash() -> None:
    state = credentials.auth_state("ml", "chat-keys", "keys", secret({"keys": API_KEY}), INTERNAL)
    assert state == credentials.AuthState(hash=credentials.auth_hash(API_KEY, INTERNAL))


def test_internal_secret_is_owned_by_the_service_and_holds_fresh_distinct_tokens() -> None:
    tokens = credentials.new_tokens()
    assert tokens != credentials.new_tokens()
    assert tokens["internal-token"] != tokens["admin-token"] and len(tokens["admin-token"]) >= 40
    manifest = children.internal_secret(OWNER, tokens)
    assert manifest["metadata"]["name"] == "chat-internal"
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert credentials.secret_data(manifest) == {k: v.encode() for k, v in tokens.items()}
    assert credentials.admin_token(credentials.secret_data(manifest)) == tokens["admin-token"].encode()
