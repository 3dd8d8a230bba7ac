"""`kvflock up --apply` with auth: Secrets in the file are applied, a missing API-key Secret is made
with a random key, and the printed hint says how to read the key without showing it."""

from __future__ import annotations

import base64
from pathlib import Path

import kubernetes.client
import pytest

from kvflock.local.up import api_key, apply, key_hint, read_manifests, wait_ready

REPO = Path(__file__).resolve().parents[2]


def test_example_gets_a_random_key_secret_and_the_hint_reads_it_from_there(
        api_client: kubernetes.client.ApiClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply(api_client, REPO / "examples" / "smollm2-auth.yaml") == ["default/smollm2-auth"]
    assert "created Secret default/smollm2-keys with a random API key" in capsys.readouterr().out
    service = kubernetes.client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "kvflock.dev", "v1alpha1", "default", "inferenceservices", "smollm2-auth")
    key = api_key(api_client, "default", service)
    assert key and key.startswith("sk-kvflock-") and len(key) > 40
    hint = key_hint(Path("/tmp/kubeconfig"), "default", service, "http://127.0.0.1:30080")
    assert "kubectl get secret smollm2-keys -n default -o jsonpath='{.data.keys}'" in hint and key not in hint
    assert apply(api_client, REPO / "examples" / "smollm2-auth.yaml") == ["default/smollm2-auth"]
    assert api_key(api_client, "default", service) == key  # an existing Secret is kept


def test_secret_in_the_same_file_is_applied_and_its_first_key_is_used(
        api_client: kubernetes.client.ApiClient, tmp_path: Path) -> None:
    manifest = tmp_path / "chat.yaml"
    keys = base64.b64encode(b"# rotated monthly\nsk-one\nsk-two\n").decode()
    manifest.write_text(f"""apiVersion: v1
kind: Secret
metadata: {{name: chat-keys}}
data: {{keys: {keys}}}
---
apiVersion: kvflock.dev/v1alpha1
kind: InferenceService
metadata: {{name: chat}}
spec:
  resources: {{gpusPerReplica: 0}}
  auth: {{apiKeySecretRef: {{name: chat-keys, key: keys}}}}
""")
    assert apply(api_client, manifest) == ["default/chat"]
    service = {"metadata": {"name": "chat"}, "spec": {"auth": {"apiKeySecretRef": {"name": "chat-keys", "key": "keys"}}}}
    assert api_key(api_client, "default", service) == "sk-one"
    assert key_hint(Path("k"), "default", {"metadata": {"name": "x"}, "spec": {}}, "u") == ""


def test_other_kinds_are_refused_naming_the_kind(api_client: kubernetes.client.ApiClient, tmp_path: Path) -> None:
    manifest = tmp_path / "cm.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match="kind 'ConfigMap'.*InferenceServices .* and Secrets only"):
        apply(api_client, manifest)


def test_a_bad_spec_is_refused_naming_the_file_document_and_field(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("apiVersion: kvflock.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: chat}\n"
                        "spec: {replicas: two}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: document 1 \(chat\): spec.replicas"):
        read_manifests(manifest)
    manifest.write_text("apiVersion: [\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        read_manifests(manifest)


def test_waiting_stops_with_the_operators_reason_when_the_spec_cannot_run(
        api_client: kubernetes.client.ApiClient) -> None:
    custom = kubernetes.client.CustomObjectsApi(api_client)
    custom.create_namespaced_custom_object("kvflock.dev", "v1alpha1", "default", "inferenceservices", {
        "apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "odd"}, "spec": {}})
    degraded = {"type": "Degraded", "status": "True", "reason": "InvalidSpec", "message": "spec.engine: no good"}
    custom.patch_namespaced_custom_object_status("kvflock.dev", "v1alpha1", "default", "inferenceservices", "odd",
                                                 {"status": {"conditions": [degraded]}})
    with pytest.raises(ValueError, match="default/odd cannot become Ready: InvalidSpec: spec.engine: no good"):
        wait_ready(api_client, "default", "odd", timeout=600)
