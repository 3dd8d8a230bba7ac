"""The OpenAPI v3 documents that `kubectl apply` reads before it sends a custom resource.

kubectl validates what it applies either itself, from the protobuf OpenAPI v2 document, or
by asking the server to (``fieldValidation=Strict``) when the OpenAPI v3 document of the
object's group/version says that its PATCH operation takes that parameter. The local API
server serves the second: a v3 document per group/version of each installed CRD, with the
CRD's schema and the operations kubectl looks for; the server then validates what it is sent
(`kvflock.local.validation`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["group_version_document", "root_document"]

# The query parameters of Kubernetes' write operations that clients probe for.
_WRITE_PARAMETERS = ("dryRun", "fieldManager", "fieldValidation", "force")


def _group_version_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _schema_name(group: str, version: str, kind: str) -> str:
    """Kubernetes' name of a schema: the group reversed, e.g. dev.kvflock.v1alpha1.InferenceService."""
    return ".".join([*reversed(group.split(".")), version, kind])


def _served(crds: list[Mapping[str, Any]]) -> dict[tuple[str, str], list[tuple[Mapping[str, Any], Mapping[str, Any]]]]:
    """(group, version) -> [(crd, version entry)] for every served version."""
    result: dict[tuple[str, str], list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for crd in crds:
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                result.setdefault((crd["spec"]["group"], version["name"]), []).append((crd, version))
    return result


def group_version_document(crds: list[Mapping[str, Any]], group: str, version: str) -> dict[str, Any] | None:
    """The OpenAPI v3 document of one group/version (None if no CRD serves it)."""
    entries = _served(crds).get((group, version))
    if not entries:
        return None
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for crd, entry in entries:
        spec = crd["spec"]
        kind, plural = spec["names"]["kind"], spec["names"]["plural"]
        gvk = {"group": group, "version": version, "kind": kind}
        name = _schema_name(group, version, kind)
        schema = dict((entry.get("schema") or {}).get("openAPIV3Schema") or {"type": "object"})
        schemas[name] = {**schema, "x-kubernetes-group-version-kind": [gvk]}
        body = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
        parameters = [{"name": p, "in": "query", "schema": {"type": "string"}} for p in _WRITE_PARAMETERS]
        scope = "namespaces/{namespace}/" if spec.get("scope", "Namespaced") == "Namespaced" else ""
        base = f"/apis/{group}/{version}/{scope}{plural}"
        operations = {"x-kubernetes-group-version-kind": gvk, "parameters": parameters, "requestBody": body,
                      "responses": {"200": body}}
        paths[base] = {"post": {**operations, "x-kubernetes-action": "post"}}
        paths[base + "/{name}"] = {
            "get": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "get", "responses": {"200": body}},
            "patch": {**operations, "x-kubernetes-action": "patch"},
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": version},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def root_document(crds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The OpenAPI v3 index: where each group/version's document is, with a hash of it."""
    paths = {}
    for group, version in sorted(_served(crds)):
        document = group_version_document(crds, group, version)
        digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16].upper()
        path = _group_version_path(group, version)
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": paths}
