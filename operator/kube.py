"""The operator's reads and writes of Kubernetes objects, through the kubernetes client.

Everything the operator asks of the API server goes through `Cluster`, and `RBAC_RULES`
lists exactly those calls (with kopf's own), so that the helm chart's ClusterRole can be
checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from kvflock.operator import children, inference_pool, router_children
from kvflock.operator.children import Owner
from kvflock.operator.crd import GROUP, PLURAL, VERSION
from kvflock.shared import names

# (apiGroup, resource, verbs): what the operator's code calls, and what kopf needs.
RBAC_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    (GROUP, PLURAL, ("get", "list", "watch", "patch")),  # kopf watches and patches; get_service reads
    (GROUP, f"{PLURAL}/status", ("patch",)),  # patch_service_status
    ("", "pods", ("list", "watch", "create", "patch", "delete")),  # kopf watches the workers and the router
    ("", "services", ("list", "create", "patch", "delete")),
    # get: the router's Role grants it, and a Role may only grant what its creator holds
    ("", "configmaps", ("get", "list", "create", "patch", "delete")),
    ("", "serviceaccounts", ("list", "create", "patch", "delete")),  # the router's identity
    ("rbac.authorization.k8s.io", "roles", ("list", "create", "patch", "delete")),
    ("rbac.authorization.k8s.io", "rolebindings", ("list", "create", "patch", "delete")),
    (GROUP, f"{PLURAL}/scale", ("patch",)),  # the autoscaler writes replicas as kubectl scale does
    ("policy", "poddisruptionbudgets", ("list", "create", "patch", "delete")),
    # spec.inferencePool's child; listed only where the Inference Extension's CRD is installed
    (inference_pool.GROUP, inference_pool.PLURAL, ("list", "create", "patch", "delete")),
    ("", "events", ("create",)),  # kopf posts the Events
    # kopf watches the API-key Secrets (a new key rolls the pods); get_secret reads them and the
    # internal Secret, which create_secret makes. Only hashes of their contents leave the operator.
    ("", "secrets", ("get", "list", "watch", "create")),
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),  # kopf's resource scanning
    ("", "namespaces", ("list", "watch")),  # kopf's namespace observation
    # Leader election between operator replicas (kopf's peering): each writes its keep-alive into
    # the peering object's status and watches the others'. Cluster-wide operators use the
    # ClusterKopfPeering, namespaced ones a KopfPeering.
    ("kopf.dev", "clusterkopfpeerings", ("get", "list", "watch", "patch")),
    ("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch")),
]

_MERGE_PATCH = "application/merge-patch+json"


class Cluster:
    """Typed access to an InferenceService and its children, as plain dicts."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self._client = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._policy = kubernetes.client.PolicyV1Api(api_client)
        self._rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)

    def _plain(self, obj: Any) -> Any:
        return self._client.sanitize_for_serialization(obj)

    def get_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The InferenceService, or None if it is gone."""
        try:
            obj = self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return cast(dict[str, Any], obj)

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret, or None if it does not exist."""
        try:
            secret = self._core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return cast(dict[str, Any], self._plain(secret))

    def create_secret(self, manifest: Mapping[str, Any]) -> bool:
        """Create a Secret; False if it already exists (another pass created it)."""
        try:
            self._core.create_namespaced_secret(manifest["metadata"]["namespace"], manifest)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set spec.replicas through the scale subresource, as kubectl scale and an HPA do."""
        self._custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": replicas}}, _content_type=_MERGE_PATCH
        )

    def patch_service_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _content_type=_MERGE_PATCH
        )

    def list_children(self, owner: Owner) -> tuple[list[dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
        """The owner's worker pods, and its other children by (kind, name)."""
        namespace = owner.namespace
        labels = f"{names.LABEL_SERVICE}={owner.name}"
        router_labels = ",".join(f"{k}={v}" for k, v in router_children.router_selector(owner).items())
        pods = self._core.list_namespaced_pod(namespace, label_selector=children.selector_string(owner)).items
        others = [
            *self._core.list_namespaced_service(namespace, label_selector=labels).items,
            *self._core.list_namespaced_config_map(namespace, label_selector=labels).items,
            *self._policy.list_namespaced_pod_disruption_budget(namespace, label_selector=labels).items,
            *self._core.list_namespaced_pod(namespace, label_selector=router_labels).items,
            *self._core.list_namespaced_service_account(namespace, label_selector=router_labels).items,
            *self._rbac.list_namespaced_role(namespace, label_selector=router_labels).items,
            *self._rbac.list_namespaced_role_binding(namespace, label_selector=router_labels).items,
        ]

        def owned(obj: dict[str, Any]) -> bool:
            refs = obj["metadata"].get("ownerReferences") or []
            return any(ref.get("uid") == owner.uid for ref in refs)

        kinds = {"V1Service": "Service", "V1ConfigMap": "ConfigMap", "V1PodDisruptionBudget": "PodDisruptionBudget",
                 "V1Pod": "Pod", "V1ServiceAccount": "ServiceAccount", "V1Role": "Role", "V1RoleBinding": "RoleBinding"}
        objects: dict[tuple[str, str], dict[str, Any]] = {}
        for item in others:
            plain = self._plain(item)
            if owned(plain):
                objects[(kinds[type(item).__name__], plain["metadata"]["name"])] = plain
        for pool in self._inference_pools(namespace, labels):
            if owned(pool):
                objects[(inference_pool.KIND, pool["metadata"]["name"])] = pool
        return [p for p in map(self._plain, pods) if owned(p)], objects

    def _inference_pools(self, namespace: str, labels: str) -> list[dict[str, Any]]:
        """The InferencePools with these labels; none where the Inference Extension is not installed."""
        try:
            found = self._custom.list_namespaced_custom_object(
                inference_pool.GROUP, inference_pool.VERSION, namespace, inference_pool.PLURAL, label_selector=labels)
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        return list(found.get("items") or [])

    def _custom_calls(self, group: str, version: str, plural: str) -> tuple[Callable[..., Any], ...]:
        """(create, patch, delete) for a custom resource, with the core calls' signatures."""
        custom = self._custom

        def create(namespace: str, body: Mapping[str, Any]) -> Any:
            return custom.create_namespaced_custom_object(group, version, namespace, plural, body)

        def patch(name: str, namespace: str, body: Mapping[str, Any], **kwargs: Any) -> Any:
            return custom.patch_namespaced_custom_object(group, version, namespace, plural, name, body, **kwargs)

        def delete(name: str, namespace: str) -> Any:
            return custom.delete_namespaced_custom_object(group, version, namespace, plural, name)

        return create, patch, delete

    def _calls(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        """(create, patch, delete) for a child kind."""
        calls: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {
            "Pod": (self._core.create_namespaced_pod, self._core.patch_namespaced_pod,
                    self._core.delete_namespaced_pod),
            "Service": (self._core.create_namespaced_service, self._core.patch_namespaced_service,
                        self._core.delete_namespaced_service),
            "ConfigMap": (self._core.create_namespaced_config_map, self._core.patch_namespaced_config_map,
                          self._core.delete_namespaced_config_map),
            "PodDisruptionBudget": (self._policy.create_namespaced_pod_disruption_budget,
                                    self._policy.patch_namespaced_pod_disruption_budget,
                                    self._policy.delete_namespaced_pod_disruption_budget),
            "ServiceAccount": (self._core.create_namespaced_service_account,
                               self._core.patch_namespaced_service_account,
                               self._core.delete_namespaced_service_account),
            "Role": (self._rbac.create_namespaced_role, self._rbac.patch_namespaced_role,
                     self._rbac.delete_namespaced_role),
            "RoleBinding": (self._rbac.create_namespaced_role_binding, self._rbac.patch_namespaced_role_binding,
                            self._rbac.delete_namespaced_role_binding),
            inference_pool.KIND: self._custom_calls(inference_pool.GROUP, inference_pool.VERSION, inference_pool.PLURAL),
        }
        return calls[kind]

    def create(self, manifest: Mapping[str, Any]) -> bool:
        """Create a child; False if it already exists (another pass created it)."""
        create, _, _ = self._calls(manifest["kind"])
        try:
            create(manifest["metadata"]["namespace"], manifest)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def patch(self, manifest: Mapping[str, Any]) -> None:
        _, patch, _ = self._calls(manifest["kind"])
        meta = manifest["metadata"]
        patch(meta["name"], meta["namespace"], manifest, _content_type=_MERGE_PATCH)

    def annotate(self, kind: str, namespace: str, name: str, annotations: Mapping[str, str | None]) -> None:
        _, patch, _ = self._calls(kind)
        patch(name, namespace, {"metadata": {"annotations": dict(annotations)}}, _content_type=_MERGE_PATCH)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a child; False if it was already gone."""
        _, _, delete = self._calls(kind)
        try:
            delete(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True
