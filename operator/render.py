"""Rendering the CustomResourceDefinition from the models of `kvflock.operator.crd`: their JSON
schema made structural (OpenAPI v3 as Kubernetes wants it), the CRD around it, and its YAML
files (`kvflock crds`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kvflock.operator.crd import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    InferenceServiceSpec,
    InferenceServiceStatus,
)

_DROPPED_KEYS = {"title", "$defs"}


def _structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn a pydantic JSON schema node into a Kubernetes structural OpenAPI v3 schema.

    References are inlined, optional fields become plain (absent rather than null), free-form
    objects preserve unknown fields, numeric exclusive bounds take the OpenAPI v3.0 form, and
    nested objects and lists default to empty ones, so that the API server fills in the
    defaults inside them and CEL rules can rely on them being present. Objects that the model
    makes optional (`X | None`) get no such default: their absence means something (`auth`
    off), and an empty one would miss its required fields.
    """
    if "$ref" in schema:
        resolved = defs[schema["$ref"].rsplit("/", 1)[-1]]
        return _structural({**resolved, **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
    if "anyOf" in schema:  # Optional[X] from pydantic: anyOf [X, null]
        (option,) = [s for s in schema["anyOf"] if s.get("type") != "null"]
        rest = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
        return _structural({**option, **rest}, defs)
    if schema.get("type") == "object" and schema.get("additionalProperties") is True:
        return {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            **({"description": schema["description"]} if "description" in schema else {}),
        }
    out: dict[str, Any] = {}
    optional: set[str] = set()
    for key, value in schema.items():
        if key in _DROPPED_KEYS or (key == "additionalProperties" and value is False):
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
            optional = {name for name, sub in value.items() if {"type": "null"} in sub.get("anyOf", [])}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    required = set(out.get("required", []))
    for name, sub in out.get("properties", {}).items():
        if name in required | optional or "default" in sub or sub.get("x-kubernetes-preserve-unknown-fields"):
            continue
        if sub.get("type") == "array":
            sub["default"] = []
        elif sub.get("type") == "object":
            sub["default"] = {}
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, as a CRD version's schema wants it."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def render_crd() -> dict[str, Any]:
    """The InferenceService CustomResourceDefinition, rendered from the models."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["kvflock"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An InferenceService runs a language model on replicas of the"
                            " kvflock engine behind one OpenAI-compatible endpoint.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": {**openapi_schema(InferenceServiceSpec), "default": {}},
                                "status": openapi_schema(InferenceServiceStatus),
                            },
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".status.model"},
                        {"name": "Layout", "type": "string", "jsonPath": ".status.layout"},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


HEADER = "# Generated by `kvflock crds` from operator/crd.py (kvflock.operator.crd). Do not edit.\n"


def render_peering_crds() -> list[dict[str, Any]]:
    """kopf's peering CRDs (ClusterKopfPeering, KopfPeering): operator replicas elect their
    leader through an object of one of them, each writing its keep-alive into its status."""
    schema = {"type": "object", "properties": {
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    crds = []
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        plural = kind.lower() + "s"
        crds.append({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {
                "group": "kopf.dev", "scope": scope,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}],
            },
        })
    return crds


def crd_files() -> dict[str, str]:
    """File name -> YAML text of every CRD the project defines (and kopf's peering ones)."""
    return {
        "inferenceservice.yaml": HEADER + yaml.safe_dump(render_crd(), sort_keys=False, width=100),
        "kopfpeering.yaml": HEADER + yaml.safe_dump_all(render_peering_crds(), sort_keys=False, width=100),
    }


def write_crds(output_dir: str | Path, check: bool = False) -> list[Path]:
    """Write the CRD files that differ (or, with `check`, only list them)."""
    folder = Path(output_dir)
    stale = []
    for name, text in crd_files().items():
        path = folder / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return stale
