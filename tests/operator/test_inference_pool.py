"""spec.inferencePool: the InferencePool (valid by the Gateway API Inference Extension's published
CRD, vendored in data/), the endpoint picker's flags for our metric names, the workers' access for
the gateway, and the operator under kopf creating the pool where the extension's CRD is installed."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client
import pytest
import yaml

from kvflock.operator import inference_pool
from kvflock.operator.children import Owner
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.operator.kube import RBAC_RULES
from kvflock.operator.reconcile import Observed, reconcile
from kvflock.shared import metrics, names

from .conftest import FakeWorkers, ServerThread, wait_for
from .test_operator import NS, Cluster, operator  # noqa: F401  (the operator fixture)

CRD = yaml.safe_load((Path(__file__).parent / "data" / "inferencepools.inference.networking.k8s.io-v1.6.0.yaml")
                     .read_text())
OWNER = Owner(name="chat", namespace="ml", uid="uid-1")
NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


def schema(version: str = "v1") -> dict[str, Any]:
    (served,) = [v for v in CRD["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def spec(**fields: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}, **fields})


def desired(s: InferenceServiceSpec) -> dict[tuple[str, str], dict[str, Any]]:
    plan = reconcile(OWNER, s, Observed(pods=[]), NOW, generation=1)
    return {(a.kind, a.name): dict(a.manifest) for a in plan.actions if a.verb == "create" and a.manifest}


def test_the_vendored_crd_is_the_extensions_ga_inference_pool() -> None:
    assert CRD["spec"]["group"] == inference_pool.GROUP and CRD["spec"]["names"]["plural"] == inference_pool.PLURAL
    assert inference_pool.VERSION in [v["name"] for v in CRD["spec"]["versions"] if v["served"] and v["storage"]]


@pytest.mark.parametrize("picker", [{}, {"serviceName": "gw-epp", "port": 9003, "failureMode": "FailOpen"}],
                         ids=["defaults", "custom-picker"])
def test_the_rendered_pool_selects_the_workers_and_is_valid_by_the_published_schema(picker: dict[str, Any]) -> None:
    children = desired(spec(inferencePool={"endpointPicker": picker},
                            router={"pools": [{"name": "short", "maxPromptTokens": 512}, {"name": "long"}]}))
    pool = children[("InferencePool", "chat")]
    jsonschema.validate(pool, schema())
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert pool["spec"]["selector"] == {"matchLabels": {names.LABEL_SERVICE: "chat", names.LABEL_ROLE: names.ROLE_WORKER}}
    assert pool["spec"]["targetPorts"] == [{"number": names.WORKER_PORT}]
    ref = pool["spec"]["endpointPickerRef"]
    assert (ref["name"], ref["port"], ref["failureMode"]) == (
        picker.get("serviceName", "chat-epp"), {"number": picker.get("port", 9002)}, picker.get("failureMode", "FailClose"))
    # Every worker pod, of every length pool, carries the pool's selector labels.
    workers = [m for (kind, name), m in children.items() if kind == "Pod" and "-w-" in name]
    assert len(workers) == 2 and all(
        pool["spec"]["selector"]["matchLabels"].items() <= w["metadata"]["labels"].items() for w in workers)


def test_the_published_schema_refuses_what_the_api_server_would() -> None:
    pool = desired(spec(inferencePool={}))[("InferencePool", "chat")]
    broken = {**pool, "spec": {**pool["spec"], "targetPorts": [{"number": 0}]}}
    with pytest.raises(jsonschema.ValidationError, match="0 is less than the minimum of 1"):
        jsonschema.validate(broken, schema())


def test_the_picker_configmap_names_the_vllm_gauges_the_workers_export() -> None:
    flags = desired(spec(inferencePool={}))[("ConfigMap", "chat-epp")]["data"]["flags"].splitlines()
    assert f"--total-queued-requests-metric={metrics.VLLM_REQUESTS_WAITING}" in flags
    assert f"--total-running-requests-metric={metrics.VLLM_REQUESTS_RUNNING}" in flags
    assert f"--kv-cache-usage-percentage-metric={metrics.VLLM_KV_CACHE_USAGE}" in flags
    assert {"--pool-name=chat", "--pool-namespace=ml", "--model-server-metrics-path=/metrics"} <= set(flags)
    assert metrics.VLLM_REQUESTS_WAITING == "vllm:num_requests_waiting"
    assert metrics.VLLM_KV_CACHE_USAGE == "vllm:kv_cache_usage_perc"


def test_the_gateway_example_renders_a_pool_valid_by_the_published_schema() -> None:
    example = yaml.safe_load((Path(__file__).parents[2] / "examples" / "llama-3-8b-gateway.yaml").read_text())
    children = desired(InferenceServiceSpec.model_validate(example["spec"]))
    jsonschema.validate(children[("InferencePool", "chat")], schema())
    assert ("ConfigMap", "chat-epp") in children


def test_no_pool_without_the_field() -> None:
    assert not [key for key in desired(spec()) if key[0] == "InferencePool" or key[1] == "chat-epp"]


def worker_command(s: InferenceServiceSpec) -> list[str]:
    return desired(s)[("Pod", "chat-w-0")]["spec"]["containers"][0]["command"]


def test_with_auth_the_gateways_proxy_may_call_the_workers_with_a_users_key() -> None:
    auth = {"apiKeySecretRef": {"name": "chat-keys", "key": "keys"}}
    behind_router = worker_command(spec(auth=auth))
    behind_gateway = worker_command(spec(auth=auth, inferencePool={}))
    assert "--api-key-file" not in behind_router and "--internal-token-file" in behind_router
    assert "--api-key-file" in behind_gateway and "--internal-token-file" in behind_gateway


def test_the_operators_rbac_covers_inference_pools() -> None:
    assert (inference_pool.GROUP, inference_pool.PLURAL, ("list", "create", "patch", "delete")) in RBAC_RULES


@pytest.fixture
def apiserver_with_pools(apiserver: ServerThread) -> Iterator[ServerThread]:
    apiserver.api.install_crd(CRD)
    yield apiserver


def test_the_operator_creates_the_pool_where_the_extension_is_installed(
    apiserver_with_pools: ServerThread, operator: None, api_client: kubernetes.client.ApiClient,  # noqa: F811
    fake_workers: FakeWorkers,
) -> None:
    cluster = Cluster(api_client, fake_workers)
    uid = cluster.create("chat", {"replicas": 1, "resources": {"gpusPerReplica": 0}, "inferencePool": {}})["metadata"]["uid"]

    def pool() -> dict[str, Any] | None:
        found = cluster.custom.list_namespaced_custom_object(inference_pool.GROUP, inference_pool.VERSION, NS,
                                                             inference_pool.PLURAL)["items"]
        return found[0] if found else None

    created = wait_for(pool, what="the InferencePool")
    jsonschema.validate(created, schema())
    assert created["metadata"]["ownerReferences"][0]["uid"] == uid
    assert "--pool-name=chat" in cluster.core.read_namespaced_config_map("chat-epp", NS).data["flags"]
    cluster.wait_ready("chat", 1)  # the extra children do not keep the service from Ready


def test_removing_the_field_deletes_the_pool_and_the_picker_configmap() -> None:
    with_pool = desired(spec(inferencePool={}))
    observed = Observed(pods=[], objects={key: with_pool[key] for key in (("InferencePool", "chat"), ("ConfigMap", "chat-epp"))})
    plan = reconcile(OWNER, spec(), observed, NOW, generation=2)
    deleted = {(a.kind, a.name) for a in plan.actions if a.verb == "delete"}
    assert deleted == {("InferencePool", "chat"), ("ConfigMap", "chat-epp")}
    # While the field is set, nothing of it is deleted.
    assert not [a for a in reconcile(OWNER, spec(inferencePool={}), observed, NOW, generation=2).actions
                if a.verb == "delete"]


def test_the_operator_deletes_the_pool_when_the_field_is_removed(
    apiserver_with_pools: ServerThread, operator: None, api_client: kubernetes.client.ApiClient,  # noqa: F811
    fake_workers: FakeWorkers,
) -> None:
    cluster = Cluster(api_client, fake_workers)
    cluster.create("chat", {"replicas": 1, "resources": {"gpusPerReplica": 0}, "inferencePool": {}})

    def pools() -> list[dict[str, Any]]:
        return cluster.custom.list_namespaced_custom_object(inference_pool.GROUP, inference_pool.VERSION, NS,
                                                            inference_pool.PLURAL)["items"]

    def picker_configmaps() -> list[str]:
        return [c.metadata.name for c in cluster.core.list_namespaced_config_map(NS).items if c.metadata.name == "chat-epp"]

    wait_for(lambda: pools() and picker_configmaps(), what="the InferencePool and its picker ConfigMap")
    cluster.patch_spec("chat", {"inferencePool": None})
    wait_for(lambda: not pools() and not picker_configmaps(), what="the pool's children deleted")
    cluster.wait_ready("chat", 1)
