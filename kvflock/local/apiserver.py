"""An in-process Kubernetes API server: kmock's KubernetesEmulator plus what it lacks.

The emulator stores objects as plain JSON and merges patches. kopf, the kubernetes client
and kubectl expect more of an API server, and `ApiServer` adds it around the emulator:

- 201 Created for creations (the kubernetes client reads the new object only then);
- object metadata kept by the server: ``uid``, ``creationTimestamp``, ``resourceVersion``,
  ``generation`` (bumped when ``spec`` changes), names from ``generateName``;
- the status subresource (``/status`` writes only the status, the main resource never does)
  and the scale subresource (``autoscaling/v1`` Scale read and written through the paths
  that the CRD's ``subresources.scale`` names);
- JSON patches (a failed ``test`` is 422, which kopf's optimistic concurrency expects),
  merge patches, strategic-merge patches and server-side apply patches (the latter two treated
  as merges; an apply patch of a missing object creates it), and updates (PUT);
- custom objects admitted as kube-apiserver admits them (`kvflock.local.validation`): unknown
  fields pruned (or refused, as ``fieldValidation`` asks), defaults applied, the CRD's schema
  and CEL rules enforced on every create, update, patch and scale, or a 422 naming the fields;
- label selectors and ``metadata.name``/``metadata.namespace`` field selectors on lists and
  watches, and the ``timeoutSeconds`` of watches;
- garbage collection of dependents by ``ownerReferences`` when an owner is gone;
- CustomResourceDefinitions installed from their manifests (discovery and storage);
- the namespaces a new cluster has (default, kube-system, kube-public), and the
  namespaces resource's own URLs, which kmock 0.8 cannot parse;
- for kubectl: the OpenAPI v3 documents of the CRDs (`kvflock.local.openapi`) and Tables for
  `kubectl get` (`kvflock.local.tables`).

It serves tests (``tests/operator``) and the local cluster (``kvflock up``). Serve it with
``kmock.Server(api_server, port=...)`` inside a running event loop.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing, rendering

from kvflock.local import openapi, tables, validation

__all__ = ["ApiServer", "LabelSelector", "merge_diff"]

_CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_NAMESPACES = kmock.resource("", "v1", "namespaces")
_SCALE_METADATA = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
# Metadata that only the server writes; clients' values for them are ignored.
_SERVER_METADATA = ("uid", "creationTimestamp", "resourceVersion", "generation", "deletionTimestamp")
_APPLY_PATCH = "application/apply-patch+yaml"


class LabelSelector:
    """A parsed Kubernetes label selector string, e.g. ``app=x,tier in (a,b),!legacy``."""

    _TERM = re.compile(
        r"^\s*(?:(?P<not>!)\s*(?P<absent>[\w./-]+)"
        r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)"
        r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*$"
    )

    def __init__(self, text: str) -> None:
        self._checks: list[tuple[str, str, frozenset[str]]] = []
        for term in re.split(r",(?![^(]*\))", text.strip()):
            if not term.strip():
                continue
            match = self._TERM.match(term)
            if match is None:
                raise ValueError(f"Invalid label selector term {term!r} in {text!r}.")
            if match["absent"]:
                self._checks.append(("!", match["absent"], frozenset()))
            elif match["op"]:
                op = "!=" if match["op"] == "!=" else "="
                self._checks.append((op, match["key"], frozenset([match["value"]])))
            elif match["setop"]:
                values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
                self._checks.append((match["setop"], match["key"], values))
            else:
                self._checks.append(("exists", match["key"], frozenset()))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether an object with these labels is selected."""
        for op, key, values in self._checks:
            value = labels.get(key)
            ok = {
                "=": value in values,
                "in": value in values,
                "!=": value not in values,
                "notin": value not in values,
                "exists": key in labels,
                "!": key not in labels,
            }[op]
            if not ok:
                return False
        return True


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif isinstance(value, Mapping) and isinstance(old[key], Mapping):
            sub = merge_diff(old[key], value)
            if sub:
                patch[key] = sub
        elif value != old[key]:
            patch[key] = copy.deepcopy(value)
    return patch


_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces(?:/(?P<name>[^/]+))?(?:/(?P<sub>status|finalize))?/?")
_parse_path_of_kmock = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads /api/v1/namespaces[/NAME] as a namespace prefix and fails; the
    namespaces resource itself (which kopf watches) is parsed here instead."""
    match = _NAMESPACE_PATH.fullmatch(path)
    if match is None:
        return _parse_path_of_kmock(path)
    return parsing.ParsedPath("", "v1", "namespaces", None, match["name"], match["sub"])


parsing.parse_path = _parse_path


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get_path(obj: Mapping[str, Any], path: str) -> Any:
    """Read a CRD JSON path such as ``.spec.replicas`` (None where absent)."""
    value: Any = obj
    for part in path.lstrip(".").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.lstrip(".").split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[last] = value


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """A KubernetesEmulator that behaves enough like an API server for kopf and kubectl.

    It knows the built-in resources (kmock's bundled discovery data) and any CRD given to
    `install_crd`.
    """

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    # Per custom resource: (specReplicasPath, statusReplicasPath, labelSelectorPath | None).
    _scale_paths: dict[kmock.resource, tuple[str, str, str | None]] = attrs.field(factory=dict, init=False)
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _crds: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    # Per custom resource: its CRD version's additionalPrinterColumns (kubectl get's columns).
    _printer_columns: dict[kmock.resource, list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    # Per custom resource: the admission of its objects by its CRD version's schema.
    _validators: dict[kmock.resource, validation.CustomResourceValidator] = attrs.field(factory=dict, init=False)
    # Requests remembered (kmock keeps every request for assertions and scans them on each
    # request, so a long history costs CPU while the cluster idles).
    history: int = 500

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        # Nothing here computes resource metrics, and the bundled metrics.k8s.io "pods" would
        # answer `kubectl get pods` with Pods dressed as PodMetrics.
        for resource in [r for r in self.resources if r.group == "metrics.k8s.io"]:
            del self.resources[resource]
        for namespace in ("default", "kube-system", "kube-public"):
            self.objects[_NAMESPACES, None, namespace] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace, "uid": str(uuid.uuid4()), "creationTimestamp": _now()},
                "status": {"phase": "Active"},
            }
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/apis/[^/]+/[^/]+")] << self._serve_openapi_group_version

    def install_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve a CustomResourceDefinition: its discovery, its objects, and the CRD itself.

        Raises ValueError for a CEL rule that this server cannot evaluate (`kvflock.local.cel`).
        """
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            resource = kmock.resource(spec["group"], version["name"], names["plural"])
            subresources = version.get("subresources", {})
            self._printer_columns[resource] = list(version.get("additionalPrinterColumns", []))
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema is not None:
                self._validators[resource] = validation.CustomResourceValidator(
                    names["kind"], spec["group"], version["name"], copy.deepcopy(schema)
                )
            self.resources[resource] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"create", "delete", "get", "list", "patch", "watch", "deletecollection"},
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(subresources),
            )
            if "scale" in subresources:
                scale = subresources["scale"]
                self._scale_paths[resource] = (
                    scale["specReplicasPath"],
                    scale["statusReplicasPath"],
                    scale.get("labelSelectorPath"),
                )
        stored = copy.deepcopy(dict(crd))
        stored.setdefault("metadata", {}).update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        stored["status"] = {"acceptedNames": names, "conditions": [{"type": "Established", "status": "True"}]}
        self.objects[_CRDS, None, crd["metadata"]["name"]] = stored
        self._crds.append(stored)

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        """kmock's discovery of a group/version, with the core group's version spelled ``v1``
        (not ``/v1``: kubectl finds no core resource then) and without short names and
        categories on the subresources (kubectl warns that a short name is ambiguous)."""
        result = await super()._serve_version(request)
        assert isinstance(result, dict)
        result["groupVersion"] = str(result.get("groupVersion", "")).lstrip("/")
        for entry in result.get("resources", []):
            if "/" in entry.get("name", ""):
                entry["shortNames"], entry["categories"] = [], []
        return result

    async def _serve_openapi_root(self, request: rendering.Request) -> rendering.Payload:
        return openapi.root_document(self._crds)

    async def _serve_openapi_group_version(self, request: rendering.Request) -> rendering.Payload:
        _, group, version = request.url.path.rsplit("/", 2)
        document = openapi.group_version_document(self._crds, group, version)
        if document is None:
            raise kmock.KubernetesNotFoundError(message=f"no OpenAPI document for {group}/{version}")
        return document

    def _replace(self, request: rendering.Request, **changes: Any) -> rendering.Request:
        """The request with `changes`, in its place in the history (kmock matches by identity)."""
        new = attrs.evolve(request, **changes)
        for index in range(len(self._requests) - 1, -1, -1):
            if self._requests[index] is request:
                self._requests[index] = new
                break
        return new

    def _forget_old_requests(self) -> None:
        """Bound the request history that kmock keeps for assertions (a long-lived server)."""
        if len(self._requests) > 2 * self.history:
            del self._requests[: -self.history]
            for payload in self._payloads:
                del payload._requests[: -self.history]

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self._forget_old_requests()
        if request.resource is None:
            return await super()._handle(request)
        if request.action == kmock.action.FETCH and request.subresource == "scale":
            return aiohttp.web.json_response(self._scale_of(request.resource, self._existing(request)))
        if request.action == kmock.action.WATCH:
            return await self._stream_watch(request)
        replacing = request.method == "PUT" and request.name is not None
        if replacing:
            request = self._replace(request, action=kmock.action.UPDATE)
        if request.action not in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            return await super()._handle(request)
        warnings: list[str] = []
        async with self._write_lock:
            if self._applies_to_nothing(request):
                request = self._replace(request, action=kmock.action.CREATE)
            if request.action == kmock.action.CREATE:
                data, warnings = self._created(request)
                request = self._replace(request, data=data)
            elif request.action == kmock.action.UPDATE:
                data, warnings = self._update_patch(request, replacing)
                request = self._replace(request, data=data)
            owner = self._existing(request) if request.action != kmock.action.CREATE else None
            response = await super()._handle(request)
            if owner is not None and self._existing_or_none(request) is None:
                await self._collect_garbage(owner["metadata"].get("uid"))
        if request.subresource == "scale" and request.action == kmock.action.UPDATE:
            response = aiohttp.web.json_response(self._scale_of(request.resource, self._existing(request)))
        if request.action == kmock.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)  # clients read the created object only from a 201
        for warning in warnings:
            response.headers.add("Warning", f"299 - {json.dumps(warning)}")
        return response

    def _applies_to_nothing(self, request: rendering.Request) -> bool:
        """A server-side apply patch of an object that does not exist yet (it creates it)."""
        content_type = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
        return (
            request.action == kmock.action.UPDATE
            and request.subresource is None
            and content_type.split(";")[0].strip() == _APPLY_PATCH
            and self._existing_or_none(request) is None
        )

    def _admit(self, request: rendering.Request, obj: dict[str, Any], old: dict[str, Any] | None = None,
               patch: Any = None) -> list[str]:
        """Validate a custom object about to be stored (`kvflock.local.validation`); its warnings."""
        validator = self._validators.get(request.resource) if request.resource is not None else None
        if validator is None:
            return []
        directive = validation.FieldValidation.of(request.params)
        return validator.admit(obj, directive, old=old, patch=patch)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_list(request)
        assert isinstance(result, dict) and request.resource is not None
        info = self.resources[request.resource]
        result["apiVersion"] = _api_version(request.resource)
        result["kind"] = f"{info.kind}List" if info.kind else "List"
        result["metadata"] = {"resourceVersion": str(next(self._versions))}
        result["items"] = [obj for obj in result["items"] if self._selected(request, obj)]
        if self._wants_table(request):
            return self._table(request.resource, result["items"], result["metadata"]["resourceVersion"])
        return result

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        obj = await super()._serve_fetch(request)
        if request.subresource is None and request.resource is not None and self._wants_table(request):
            assert isinstance(obj, dict)
            return self._table(request.resource, [obj], obj.get("metadata", {}).get("resourceVersion", ""))
        return obj

    @staticmethod
    def _wants_table(request: rendering.Request) -> bool:
        accept = next((v for k, v in request.headers.items() if k.lower() == "accept"), "")
        return tables.wants_table(accept)

    def _table(self, resource: kmock.resource, objects: list[dict[str, Any]], version: str) -> dict[str, Any]:
        info = self.resources[resource]
        return tables.table(info.kind or "", objects, version, self._printer_columns.get(resource))

    async def _stream_watch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """A watch as newline-delimited JSON typed ``application/json``: kmock's streams go out as
        ``application/octet-stream``, which client-go (kubectl's waits) cannot decode."""
        assert request._raw_request is not None  # a request that came over HTTP
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        try:
            async for event in self._serve_watch(request):
                if isinstance(event, dict):
                    await response.write(json.dumps(event).encode() + b"\n")
        except ConnectionResetError:
            pass  # the client went away
        return response

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        """kmock's watch, filtered by the selectors and ended after ``timeoutSeconds``."""
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        queue: asyncio.Queue[rendering.Payload] = asyncio.Queue()

        async def pump() -> None:
            async for event in super(ApiServer, self)._serve_watch(request):
                await queue.put(event)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        pumping = asyncio.create_task(pump())
        try:
            while deadline is None or loop.time() < deadline:
                remaining = None if deadline is None else deadline - loop.time()
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if not isinstance(event, dict) or self._selected(request, event.get("object", {})):
                    yield event
        finally:
            pumping.cancel()

    def _existing_or_none(self, request: rendering.Request) -> dict[str, Any] | None:
        assert request.resource is not None and request.name is not None  # a named object's request
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _existing(self, request: rendering.Request) -> dict[str, Any]:
        obj = self._existing_or_none(request)
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError(
                message=f"{request.resource} {request.namespace}/{request.name} not found"
            )
        return obj

    def _created(self, request: rendering.Request) -> tuple[dict[str, Any], list[str]]:
        """The object to store for a create request, with the server's metadata filled in, and
        the warnings to answer with."""
        if not isinstance(request.data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="the body must be an object")
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message="metadata.name or metadata.generateName is required"
                )
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            resourceVersion=str(next(self._versions)),
            generation=1,
        )
        meta.pop("deletionTimestamp", None)
        if request.resource in self._status_subresourced():
            obj.pop("status", None)
        return obj, self._admit(request, obj)

    def _update_patch(self, request: rendering.Request, replacing: bool) -> tuple[dict[str, Any], list[str]]:
        """A merge patch for the emulator that does what the request's patch (or, `replacing`,
        its new object) means here, and the warnings to answer with."""
        current = self._existing(request)
        assert request.resource is not None
        if request.subresource == "scale":
            scale = kmock_dicts.patch_dict(self._scale_of(request.resource, current), request.data or {})
            target = copy.deepcopy(current)
            _set_path(target, self._scale_paths[request.resource][0], _get_path(scale, ".spec.replicas"))
        elif replacing:
            target = self._replacement(current, request.data)
        else:
            try:
                target = copy.deepcopy(dict(kmock_dicts.patch_dict(current, request.data or {})))
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                # As the API server does: a failed "test" or a bad path is 422, not a crash.
                raise kmock.KubernetesError(status=422, reason="Invalid", message=f"the patch failed: {exc}") from exc
        # Copies of what the request keeps of the stored object: admission edits in place.
        if request.subresource == "status":
            target = {**copy.deepcopy(current), "status": target.get("status")}
        elif request.resource in self._status_subresourced():
            target = {k: v for k, v in target.items() if k != "status"}
            if "status" in current:
                target["status"] = copy.deepcopy(current["status"])
        patch = None if replacing or request.subresource == "scale" else request.data
        warnings = self._admit(request, target, old=current, patch=patch)
        meta = dict(target.get("metadata") or {})
        for key in _SERVER_METADATA:
            meta.pop(key, None)
            if key in current["metadata"]:
                meta[key] = current["metadata"][key]
        meta["resourceVersion"] = str(next(self._versions))
        if target.get("spec") != current.get("spec"):
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        target["metadata"] = meta
        return merge_diff(current, target), warnings

    @staticmethod
    def _replacement(current: Mapping[str, Any], data: Any) -> dict[str, Any]:
        """The object an update (PUT) stores: its body, if it was written over the current one."""
        if not isinstance(data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="the body must be an object")
        sent = (data.get("metadata") or {}).get("resourceVersion")
        if sent and sent != current["metadata"].get("resourceVersion"):
            name = current["metadata"].get("name")
            raise kmock.KubernetesError(
                status=409, reason="Conflict",
                message=f'Operation cannot be fulfilled on "{name}": the object has been modified;'
                " please apply your changes to the latest version and try again",
            )
        return copy.deepcopy(data)

    def _scale_of(self, resource: kmock.resource | None, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The autoscaling/v1 Scale of a custom object, read through its CRD's scale paths."""
        paths = self._scale_paths.get(resource) if resource is not None else None
        if paths is None:
            raise kmock.KubernetesNotFoundError(message=f"{resource} has no scale subresource")
        spec_path, status_path, selector_path = paths
        meta = obj["metadata"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {k: meta[k] for k in _SCALE_METADATA if k in meta},
            "spec": {"replicas": _get_path(obj, spec_path) or 0},
            "status": {
                "replicas": _get_path(obj, status_path) or 0,
                **({"selector": _get_path(obj, selector_path) or ""} if selector_path else {}),
            },
        }

    def _status_subresourced(self) -> set[kmock.resource]:
        return {res for res in self.resources if "status" in self.resources[res].subresources}

    def _selected(self, request: rendering.Request, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        labels = request.params.get("labelSelector")
        if labels and not LabelSelector(labels).matches(meta.get("labels") or {}):
            return False
        for term in filter(None, request.params.get("fieldSelector", "").split(",")):
            field, op, value = re.split(r"(!=|==|=)", term, maxsplit=1)
            actual = _get_path(obj, "." + field.strip())
            if (actual == value.strip()) != (op != "!="):
                return False
        return True

    async def _collect_garbage(self, owner_uid: str | None) -> None:
        """Delete the objects that an owner, now gone, owned (recursively, like the GC)."""
        if owner_uid is None:
            return
        async with self._lock:
            dependents = [
                (key, obj) for key, obj in self.objects.items()
                if not obj.deleted
                and any(ref.get("uid") == owner_uid for ref in obj.get("metadata", {}).get("ownerReferences", []))
            ]
            gone: list[str] = []
            for (resource, _, _), obj in dependents:
                meta = obj.get("metadata", {})
                if meta.get("finalizers"):
                    if not meta.get("deletionTimestamp"):
                        obj.patch({"metadata": {"deletionTimestamp": _now()}})
                        await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
                    continue
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})
                gone.append(meta.get("uid"))
        for uid in gone:
            await self._collect_garbage(uid)
