"""The chart, rendered by the real helm binary: it lints, renders with default values and with
every option set, and each manifest is one Kubernetes 1.30+ accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
import yaml
from kvflock.operator.render import crd_files

from kvflock import cli

from ..operator.schema import schema_errors
from .conftest import CHART, NAMESPACE, RELEASE, ROOT, VALUES_ALL, Render, of_kind, one, run_helm

# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest schemas at hand.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]


def test_helm_lint_passes_with_default_values_and_with_every_option(helm: Path) -> None:
    run_helm(helm, "lint", "--strict", str(CHART))
    run_helm(helm, "lint", "--strict", str(CHART), "--values", str(VALUES_ALL))


def test_chart_crds_are_the_generated_ones() -> None:
    chart_crds = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    committed = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert chart_crds == committed == crd_files(), (
        "helm/kvflock/crds/ differs: run `kvflock crds && kvflock crds --output-dir helm/kvflock/crds`"
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", ["default", "values-all"])
def test_every_rendered_manifest_is_valid_kubernetes(render: Render, values: str, version: str) -> None:
    manifests = render(values=[VALUES_ALL] if values == "values-all" else [])
    errors = []
    for manifest in manifests:
        if manifest["kind"] == "InferenceService":
            continue  # not a built-in kind: checked against our CRD below
        if manifest["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # the Prometheus Operator's kinds: test_monitoring.py checks them against its types
        if manifest["apiVersion"] == "kopf.dev/v1":
            continue  # the peering object: nothing but a name (crds/kopfpeering.yaml)
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {'.'.join(map(str, exc.path))}: "
                          f"{exc.message}")
    assert errors == []


def test_default_install_renders_the_operator_and_no_inference_service(
    default_manifests: list[dict[str, Any]],
) -> None:
    kinds = sorted(m["kind"] for m in default_manifests)
    assert kinds == sorted(
        ["CustomResourceDefinition", "CustomResourceDefinition", "CustomResourceDefinition", "ServiceAccount",
         "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ClusterKopfPeering"]
    )


def test_operator_serves_health_probes_and_metrics_behind_a_service(default_manifests: list[dict[str, Any]]) -> None:
    container = one(default_manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"--health-port=8080", "--metrics-port=9090"} <= set(container["args"])
    service = one(default_manifests, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics"}]


def test_operator_runs_two_replicas_electing_a_leader_through_kopf_peering(render: Render) -> None:
    manifests = render()
    spec = one(manifests, "Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    container = spec["template"]["spec"]["containers"][0]
    assert {"--peering=kvflock", "--peering-lifetime=10"} <= set(container["args"])
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert one(manifests, "ClusterKopfPeering")["metadata"]["name"] == "kvflock"
    namespaced = render(sets=["operator.scope=namespace"])
    assert one(namespaced, "KopfPeering")["metadata"]["namespace"]


@pytest.mark.parametrize("values", ["default", "values-all"])
def test_every_pod_runs_non_root_read_only_without_privileges(render: Render, values: str) -> None:
    manifests = render(values=[VALUES_ALL] if values == "values-all" else [])
    pods = [m["spec"]["template"]["spec"] for m in manifests if m["kind"] in ("Deployment", "Job")]
    pods += [m["spec"] for m in of_kind(manifests, "Pod")]
    assert len(pods) == (1 if values == "default" else 3)
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def _operator_arguments(manifests: list[dict[str, Any]]) -> Any:
    """What `kvflock` parses from the operator container's arguments (without running it)."""
    container = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    with mock.patch.object(cli, "_run_operator", return_value=0) as run:
        assert cli.main(container["args"]) == 0
    return run.call_args.args[0]


def test_operator_arguments_are_the_clis_and_watch_every_namespace_by_default(
    default_manifests: list[dict[str, Any]],
) -> None:
    args = _operator_arguments(default_manifests)
    assert (args.command, args.namespace, args.probe_interval, args.log_level) == ("operator", [], 5.0, "info")


def test_namespaced_install_watches_only_the_release_namespace(all_manifests: list[dict[str, Any]]) -> None:
    args = _operator_arguments(all_manifests)
    assert (args.namespace, args.probe_interval, args.log_level) == ([NAMESPACE], 2.5, "debug")


def test_every_option_reaches_the_manifests(all_manifests: list[dict[str, Any]]) -> None:
    deployment = one(all_manifests, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["metadata"]["name"] == "kvflock-ops"
    assert container["image"] == "registry.example.com/ml/kvflock-operator:0.1.0-rc1"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert pod["metadata"]["labels"]["team"] == "ml-platform"
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "false"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["serviceAccountName"] == "kvflock-operator"
    assert pod["spec"]["securityContext"]["fsGroup"] == 10001
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["spec"]["affinity"]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    accounts = {m["metadata"]["name"]: m for m in of_kind(all_manifests, "ServiceAccount")}
    assert accounts["kvflock-operator"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kvflock"
    }


def test_inference_service_from_values_is_valid_against_the_crd(all_manifests: list[dict[str, Any]]) -> None:
    service = one(all_manifests, "InferenceService")
    assert service["metadata"] == {
        "name": "llama-3-8b", "namespace": NAMESPACE, "labels": service["metadata"]["labels"]
    }
    assert service["spec"] == yaml.safe_load(VALUES_ALL.read_text())["inferenceService"]["spec"]
    assert schema_errors(service) == []


def test_default_inference_service_is_the_smollm2_demo_example(render: Render) -> None:
    service = one(render(sets=["inferenceService.enabled=true"]), "InferenceService")
    assert service["spec"] == yaml.safe_load((ROOT / "examples" / "smollm2-demo.yaml").read_text())["spec"]
    assert schema_errors(service) == []


def test_values_schema_checks_spec_fields_with_the_crds_own_bounds() -> None:
    values_schema = json.loads((CHART / "values.schema.json").read_text())
    checked = values_schema["properties"]["inferenceService"]["properties"]["spec"]["properties"]
    crd_spec = yaml.safe_load(crd_files()["inferenceservice.yaml"])["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field, schema in checked.items():
        for keyword, value in schema.items():
            assert crd_spec[field].get(keyword) == value, f"spec.{field}.{keyword}: the CRD says {crd_spec[field]}"


def test_helm_test_pod_asks_the_service_for_its_model(all_manifests: list[dict[str, Any]]) -> None:
    pod = one(all_manifests, "Pod", component="test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["MODELS_URL"] == f"http://llama-3-8b.{NAMESPACE}.svc:8080/v1/models"
    assert env["MODEL"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_helm_test_defaults_to_the_service_name_and_port_80(render: Render) -> None:
    manifests = render(sets=["inferenceService.enabled=true", "inferenceService.spec.replicas=1"])
    env = {e["name"]: e["value"] for e in one(manifests, "Pod", component="test")["spec"]["containers"][0]["env"]}
    assert (env["MODELS_URL"], env["MODEL"]) == (f"http://smollm2.{NAMESPACE}.svc:80/v1/models", "smollm2")


def test_uninstall_deletes_the_inference_service_before_the_operator(all_manifests: list[dict[str, Any]]) -> None:
    job = one(all_manifests, "Job", component="cleanup")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["NAMESPACE"], env["NAME"]) == (NAMESPACE, "llama-3-8b")
    assert job["spec"]["activeDeadlineSeconds"] == 120 + 60


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ([], ["handles InferenceServices in every namespace", f"rollout status deployment/{RELEASE}",
              "kubectl -n ml apply -f examples/smollm2-demo.yaml"]),
        (["inferenceService.enabled=true"], ["wait infsvc/smollm2 --for=condition=Ready",
                                             f"helm test {RELEASE} -n {NAMESPACE}",
                                             "port-forward service/smollm2 8000:80"]),
        (["operator.scope=namespace"], ["handles InferenceServices in this namespace only"]),
    ],
    ids=["default", "with-inference-service", "namespaced"],
)
def test_notes_tell_what_to_run_next(render: Render, notes_chart: Path, sets: list[str], expected: list[str]) -> None:
    notes = next(doc["notes"] for doc in render(sets=sets, chart=notes_chart) if "notes" in doc)
    for text in expected:
        assert text in notes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_network_policy_admits_only_routers_and_the_operator_to_the_workers(
    render: Render, version: str,
) -> None:
    assert of_kind(render(), "NetworkPolicy") == []  # off by default
    manifests = render(sets=["networkPolicy.enabled=true"])
    policy = one(manifests, "NetworkPolicy", component="workers")
    kubernetes_validate.validate(policy, version, strict=True)
    operator_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"kvflock.dev/role": "worker"}}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert set(rule) == {"from"}  # every port, but from these peers only
    router, operator = rule["from"]
    assert router == {"podSelector": {"matchLabels": {"kvflock.dev/role": "router"}}}
    assert set(operator) == {"podSelector"} and set(operator["podSelector"]) == {"matchLabels"}
    selector = operator["podSelector"]["matchLabels"]
    assert selector and selector.items() <= operator_labels.items()
