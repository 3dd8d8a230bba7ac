"""kvflock.local.apiserver: what it adds to kmock's emulator, seen through the kubernetes client."""

from __future__ import annotations

from typing import Any

import kubernetes.client
import kubernetes.watch
import pytest
from kubernetes.client.exceptions import ApiException

from kvflock.local.apiserver import LabelSelector, merge_diff

GROUP, VERSION, PLURAL = "kvflock.dev", "v1alpha1", "inferenceservices"
MERGE = "application/merge-patch+json"


def _service(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
        "metadata": {"name": name}, "spec": {"replicas": replicas},
    }


@pytest.fixture
def core(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client)


@pytest.fixture
def custom(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client)


def test_server_fills_in_metadata_and_names_from_generate_name(core: kubernetes.client.CoreV1Api) -> None:
    created = core.create_namespaced_config_map("default", {"metadata": {"generateName": "cm-"}, "data": {"a": "1"}})
    meta = created.metadata
    assert meta.name.startswith("cm-") and len(meta.name) > 3
    assert meta.uid and meta.creation_timestamp and meta.resource_version and meta.namespace == "default"
    other = core.create_namespaced_config_map("default", {"metadata": {"generateName": "cm-"}})
    assert other.metadata.name != meta.name


def test_generation_grows_with_spec_changes_only(custom: kubernetes.client.CustomObjectsApi) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, _service("gen"))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "gen", {"status": {"replicas": 1}},
                                                 _content_type=MERGE)
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "gen")
    assert obj["metadata"]["generation"] == 1
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "gen", {"spec": {"replicas": 2}},
                                          _content_type=MERGE)
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "gen")
    assert obj["metadata"]["generation"] == 2


def test_status_is_written_only_through_the_status_subresource(custom: kubernetes.client.CustomObjectsApi) -> None:
    with_status = {**_service("st"), "status": {"replicas": 9}}
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, with_status)
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "st",
                                          {"status": {"replicas": 7}, "spec": {"replicas": 3}}, _content_type=MERGE)
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "st")
    assert "status" not in obj and obj["spec"]["replicas"] == 3
    both = {"status": {"replicas": 3}, "spec": {"replicas": 5}}
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "st", both, _content_type=MERGE)
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "st")
    assert obj["status"]["replicas"] == 3 and obj["spec"]["replicas"] == 3


def test_scale_subresource_reads_and_writes_the_crd_paths(custom: kubernetes.client.CustomObjectsApi) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, _service("sc", replicas=2))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "sc",
                                                 {"status": {"replicas": 2, "selector": "a=b"}}, _content_type=MERGE)
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, "default", PLURAL, "sc")
    assert scale["kind"] == "Scale"
    assert (scale["spec"]["replicas"], scale["status"]["replicas"], scale["status"]["selector"]) == (2, 2, "a=b")
    custom.patch_namespaced_custom_object_scale(GROUP, VERSION, "default", PLURAL, "sc", {"spec": {"replicas": 5}},
                                                _content_type=MERGE)
    assert custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "sc")["spec"]["replicas"] == 5


def test_failed_json_patch_test_is_422(custom: kubernetes.client.CustomObjectsApi) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, _service("jp"))
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
             {"op": "replace", "path": "/spec/replicas", "value": 4}]
    with pytest.raises(ApiException) as caught:
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "jp", stale)
    assert caught.value.status == 422
    current = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "jp")
    version = current["metadata"]["resourceVersion"]
    fresh = [{"op": "test", "path": "/metadata/resourceVersion", "value": version},
             {"op": "replace", "path": "/spec/replicas", "value": 4}]
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "jp", fresh)
    assert custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "jp")["spec"]["replicas"] == 4


def test_lists_honour_label_and_field_selectors(core: kubernetes.client.CoreV1Api) -> None:
    for name, labels in [("a", {"app": "x", "tier": "web"}), ("b", {"app": "x"}), ("c", {"app": "y"})]:
        core.create_namespaced_config_map("default", {"metadata": {"name": name, "labels": labels}})
    def names(**kwargs: Any) -> list[str]:
        return sorted(i.metadata.name for i in core.list_namespaced_config_map("default", **kwargs).items)
    assert names(label_selector="app=x") == ["a", "b"]
    assert names(label_selector="app=x,!tier") == ["b"]
    assert names(label_selector="app in (x, y),tier") == ["a"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(label_selector="app notin (x)") == ["c"]


def test_deleting_an_owner_deletes_its_dependents(core: kubernetes.client.CoreV1Api) -> None:
    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map("default", {"metadata": {"name": "child", "ownerReferences": [ref]}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "stranger"}})
    core.delete_namespaced_config_map("owner", "default")
    names = sorted(i.metadata.name for i in core.list_namespaced_config_map("default").items)
    assert names == ["stranger"]


def test_finalizers_hold_deletion_until_removed(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_config_map("default", {"metadata": {"name": "held", "finalizers": ["x/y"]}})
    core.delete_namespaced_config_map("held", "default")
    assert core.read_namespaced_config_map("held", "default").metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": None}}, _content_type=MERGE)
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_config_map("held", "default")
    assert caught.value.status == 404


def test_namespaces_exist_and_can_be_read(core: kubernetes.client.CoreV1Api) -> None:
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert {"default", "kube-system"} <= names
    assert core.read_namespace("default").status.phase == "Active"


def test_discovery_serves_the_crd_with_its_subresources(api_client: kubernetes.client.ApiClient) -> None:
    resources = kubernetes.client.CustomObjectsApi(api_client).get_api_resources(GROUP, VERSION).resources
    names = {r.name for r in resources}
    assert {"inferenceservices", "inferenceservices/status", "inferenceservices/scale"} <= names
    main = next(r for r in resources if r.name == "inferenceservices")
    assert main.kind == "InferenceService" and main.namespaced and main.short_names == ["infsvc"]


def test_watch_streams_selected_objects_until_its_timeout(core: kubernetes.client.CoreV1Api) -> None:
    import threading

    seen: list[str] = []
    watcher = kubernetes.watch.Watch()

    def watch() -> None:
        stream = watcher.stream(core.list_namespaced_config_map, "default", label_selector="w=yes", timeout_seconds=2)
        seen.extend(event["object"].metadata.name for event in stream)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    core.create_namespaced_config_map("default", {"metadata": {"name": "no", "labels": {"w": "no"}}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "yes", "labels": {"w": "yes"}}})
    thread.join(timeout=10)
    assert not thread.is_alive(), "the watch did not end at its timeoutSeconds"
    assert seen == ["yes"]


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=1", {"a": "1"}, True),
        ("a==1", {"a": "2"}, False),
        ("a!=1", {}, True),
        ("a in (1,2),b", {"a": "2", "b": ""}, True),
        ("a notin (1,2)", {"a": "1"}, False),
        ("!a", {"b": "1"}, True),
        ("", {"x": "y"}, True),
    ],
)
def test_label_selector(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert LabelSelector(selector).matches(labels) is expected


def test_label_selector_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="Invalid label selector"):
        LabelSelector("a=(b")


def test_merge_diff_turns_old_into_new() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}
    new = {"a": 1, "b": {"c": 5}, "e": [1, 2], "f": None}
    assert merge_diff(old, new) == {"b": {"c": 5, "d": None}, "e": [1, 2], "f": None}


def _get_json(url: str, accept: str = "application/json") -> Any:
    import json
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=5) as response:
        return json.loads(response.read())


_TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


def test_core_discovery_names_its_group_version_v1_and_serves_no_metrics(apiserver: Any) -> None:
    assert _get_json(f"{apiserver.url}/api/v1")["groupVersion"] == "v1"
    groups = [g["name"] for g in _get_json(f"{apiserver.url}/apis")["groups"]]
    assert "kvflock.dev" in groups and "metrics.k8s.io" not in groups


def test_subresources_carry_no_short_names_in_discovery(apiserver: Any) -> None:
    resources = _get_json(f"{apiserver.url}/apis/{GROUP}/{VERSION}")["resources"]
    names = {r["name"]: r for r in resources}
    assert names[PLURAL]["shortNames"] == ["infsvc"]
    assert names[f"{PLURAL}/scale"]["shortNames"] == [] and names[f"{PLURAL}/status"]["shortNames"] == []


def test_openapi_v3_tells_kubectl_that_patches_take_field_validation(apiserver: Any) -> None:
    root = _get_json(f"{apiserver.url}/openapi/v3")
    ref = root["paths"][f"apis/{GROUP}/{VERSION}"]["serverRelativeURL"]
    document = _get_json(f"{apiserver.url}{ref}")
    patch = document["paths"][f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}/{{name}}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"]["kind"] == "InferenceService"
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    assert "spec" in document["components"]["schemas"]["dev.kvflock.v1alpha1.InferenceService"]["properties"]


def test_lists_are_tables_with_the_crd_printer_columns_when_kubectl_asks(
    apiserver: Any, custom: kubernetes.client.CustomObjectsApi
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, _service("tab", replicas=2))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "tab",
                                                 {"status": {"url": "http://127.0.0.1:30080"}}, _content_type=MERGE)
    table = _get_json(f"{apiserver.url}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}", _TABLE)
    assert table["kind"] == "Table"
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns == ["Name", "Model", "Layout", "Replicas", "Ready", "URL", "Age"]
    (row,) = table["rows"]
    assert row["cells"][:6] == ["tab", None, None, 2, 0, "http://127.0.0.1:30080"]  # readyReplicas: its default
    assert row["object"]["metadata"]["name"] == "tab"
    one = _get_json(f"{apiserver.url}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/tab", _TABLE)
    assert one["kind"] == "Table" and len(one["rows"]) == 1
    plain = _get_json(f"{apiserver.url}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/tab")
    assert plain["kind"] == "InferenceService"
