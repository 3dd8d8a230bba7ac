"""The NetworkPolicies: only the release's namespace and the chosen ones reach router pods; workers only
from routers, the operator, the named metrics scrapers and the Inference Extension gateway's pods."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, Render, of_kind, one, run_helm

KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_router_policy_admits_only_the_release_namespace_and_the_chosen_ones(render: Render, version: str) -> None:
    assert of_kind(render(), "NetworkPolicy") == []  # off by default
    manifests = render(sets=["networkPolicy.enabled=true", "networkPolicy.routerIngressNamespaces={apps,chat-ui}",
                             "networkPolicy.routerIngressNamespaceSelector.matchLabels.kvflock\\.dev/clients=allowed"])
    policy = one(manifests, "NetworkPolicy", component="routers")
    kubernetes_validate.validate(policy, version, strict=True)
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"kvflock.dev/role": "router"}}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["from"] == [
        {"podSelector": {}},  # the release's own namespace
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "chat-ui"}}},
        {"namespaceSelector": {"matchLabels": {"kvflock.dev/clients": "allowed"}}},
    ]


def test_without_chosen_namespaces_only_the_release_namespace_reaches_the_routers(render: Render) -> None:
    policy = one(render(sets=["networkPolicy.enabled=true"]), "NetworkPolicy", component="routers")
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]


def test_a_bad_namespace_name_fails_with_the_schemas_message(helm: Path) -> None:
    done = run_helm(helm, "template", "x", str(CHART), "--set", "networkPolicy.routerIngressNamespaces={Bad_NS}",
                    check=False)
    assert done.returncode != 0 and "routerIngressNamespaces" in done.stderr


def test_workers_admit_the_metrics_scrapers_namespaces_only_when_named(render: Render) -> None:
    def sources(*sets: str) -> list:
        policy = one(render(sets=["networkPolicy.enabled=true", *sets]), "NetworkPolicy", component="workers")
        return policy["spec"]["ingress"][0]["from"]

    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert scraper not in sources()
    assert scraper in sources("networkPolicy.metricsScraperNamespaces={monitoring}")


def _gateway_values(tmp_path: Path, gateway: dict) -> Path:
    values = tmp_path / "gateway.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"enabled": True, "inferenceGateway": gateway}}))
    return values


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_workers_admit_each_labelled_gateway_pod_of_each_named_namespace(render: Render, tmp_path: Path,
                                                                         version: str) -> None:
    gateway = {"namespaces": ["gateway", "edge"],
               "podLabels": [{"app": "chat-epp"}, {"gateway.networking.k8s.io/gateway-name": "inference-gateway"}]}
    policy = one(render(values=[_gateway_values(tmp_path, gateway)]), "NetworkPolicy", component="workers")
    kubernetes_validate.validate(policy, version, strict=True)
    sources = policy["spec"]["ingress"][0]["from"]
    # Namespace and labels in one peer: both must match (two peers would admit either).
    assert [s for s in sources if "namespaceSelector" in s and "podSelector" in s] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
         "podSelector": {"matchLabels": labels}}
        for namespace in gateway["namespaces"] for labels in gateway["podLabels"]]
    # Without the setting, no gateway pod is admitted.
    default = one(render(sets=["networkPolicy.enabled=true"]), "NetworkPolicy", component="workers")
    assert not [s for s in default["spec"]["ingress"][0]["from"] if "namespaceSelector" in s and "podSelector" in s]


@pytest.mark.parametrize(("gateway", "field"), [
    ({"namespaces": ["Gateway_NS"]}, "inferenceGateway.namespaces"),
    ({"podLabels": [{}]}, "inferenceGateway.podLabels"),
    ({"podLabels": [{"app": 7}]}, "inferenceGateway.podLabels"),
    ({"namespace": ["gateway"]}, "inferenceGateway"),
], ids=["bad-namespace", "empty-label-set", "label-not-a-string", "unknown-key"])
def test_bad_gateway_values_fail_naming_the_field(helm: Path, tmp_path: Path, gateway: dict, field: str) -> None:
    done = run_helm(helm, "template", "x", str(CHART), "-f", str(_gateway_values(tmp_path, gateway)), check=False)
    assert done.returncode != 0 and field in done.stderr, done.stderr
