"""The NetworkPolicies: only the release's namespace and the chosen ones reach router pods; workers only
from routers, the operator and the named metrics scrapers."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest

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
