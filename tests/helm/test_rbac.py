"""The chart's roles grant each verb the operator uses (RBAC_RULES beside its API calls) and nothing more."""

from __future__ import annotations

from typing import Any

from kvflock.operator.kube import RBAC_RULES

from .conftest import VALUES_ALL, Render, of_kind, one

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)

# The resources in RBAC_RULES that are not namespaced: only a ClusterRole can grant them.
CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces"), ("kopf.dev", "clusterkopfpeerings")}


def needed() -> set[Grant]:
    return {(group, resource, verb) for group, resource, verbs in RBAC_RULES for verb in verbs}


def granted(role: dict[str, Any]) -> set[Grant]:
    grants = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        grants |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert not any("*" in grant for grant in grants), f"wildcards in {role['metadata']['name']}"
    return grants


def test_cluster_role_grants_exactly_the_operators_verbs(render: Render) -> None:
    manifests = render()
    assert granted(one(manifests, "ClusterRole")) == needed()
    assert of_kind(manifests, "Role") == []


def test_namespaced_install_grants_the_same_verbs_split_between_role_and_cluster_role(render: Render) -> None:
    manifests = render(sets=["operator.scope=namespace"])
    role, cluster_role = one(manifests, "Role"), one(manifests, "ClusterRole")
    assert granted(role) | granted(cluster_role) == needed()
    assert {(g, r) for g, r, _ in granted(cluster_role)} == CLUSTER_SCOPED
    assert not {(g, r) for g, r, _ in granted(role)} & CLUSTER_SCOPED
    assert role["metadata"]["namespace"] == "ml"


def test_bindings_name_the_operators_service_account_and_roles(render: Render) -> None:
    manifests = render(values=[VALUES_ALL])
    account = "kvflock-operator"
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account
    roles = {(m["kind"], m["metadata"]["name"]) for m in manifests if m["kind"] in ("Role", "ClusterRole")}
    for binding in [*of_kind(manifests, "RoleBinding"), *of_kind(manifests, "ClusterRoleBinding")]:
        if binding["metadata"]["labels"].get("app.kubernetes.io/component") == "cleanup":
            continue
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "ml"}]
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles


def test_uninstall_hook_may_only_read_and_delete_the_charts_inference_service(render: Render) -> None:
    manifests = render(values=[VALUES_ALL])
    role = one(manifests, "Role", component="cleanup")
    assert role["rules"] == [{
        "apiGroups": ["kvflock.dev"], "resources": ["inferenceservices"],
        "resourceNames": ["llama-3-8b"], "verbs": ["get", "delete"],
    }]


def test_no_roles_without_rbac_create(render: Render) -> None:
    manifests = render(sets=["rbac.create=false"])
    assert [m["kind"] for m in manifests if "Role" in m["kind"]] == []
