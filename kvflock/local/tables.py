"""Server-side printing: objects as the ``meta.k8s.io/v1`` Table that `kubectl get` asks for.

A real API server renders the columns of `kubectl get` itself: a CRD's
``additionalPrinterColumns``, each built-in kind's own columns. kubectl asks for a Table in
its Accept header and prints only NAME and AGE when it gets plain objects, so the local API
server renders Tables here for the kinds a user of the local cluster looks at: custom
resources, Pods, Events; every other kind gets Name and Age.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["age", "table", "wants_table"]

Column = tuple[str, str, Callable[[Mapping[str, Any]], Any]]  # (name, type, cell of an object)


def wants_table(accept: str) -> bool:
    """Whether an Accept header asks for a meta.k8s.io/v1 Table."""
    return any("as=Table" in part and "v=v1;" in part + ";" for part in accept.split(","))


def age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """A timestamp's age the way kubectl shows it: 45s, 3m20s, 12m, 5h3m, 9h, 3d4h, 12d."""
    if not timestamp:
        return "<unknown>"
    now = now or datetime.datetime.now(tz=datetime.UTC)
    seconds = max(0, int((now - datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if days < 2:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def _json_path(obj: Mapping[str, Any], path: str) -> Any:
    """The value at a simple JSON path such as ``.status.url`` (None where absent)."""
    value: Any = obj
    for part in path.lstrip(".").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _created(obj: Mapping[str, Any]) -> str:
    return age(obj.get("metadata", {}).get("creationTimestamp"))


def _init_status(pod: Mapping[str, Any]) -> str | None:
    """The STATUS of a pod whose init containers have not all completed: the first unfinished
    one's failure or back-off (Init:Error, Init:CrashLoopBackOff), else how many completed (Init:1/2)."""
    statuses = (pod.get("status") or {}).get("initContainerStatuses") or []
    for index, container in enumerate(statuses):
        state = container.get("state") or {}
        terminated, waiting = state.get("terminated"), state.get("waiting") or {}
        if terminated and terminated.get("exitCode") == 0:
            continue
        if terminated:
            return f"Init:{terminated.get('reason') or 'ExitCode:' + str(terminated.get('exitCode'))}"
        if waiting.get("reason") and waiting["reason"] != "PodInitializing":
            return f"Init:{waiting['reason']}"
        return f"Init:{index}/{len((pod.get('spec') or {}).get('initContainers') or statuses)}"
    return None


def _pod_status(pod: Mapping[str, Any]) -> str:
    """What kubectl's STATUS column says: Terminating, an init container's progress or failure, a
    container's waiting/terminated reason, or the phase."""
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return "Terminating"
    if initializing := _init_status(pod):
        return initializing
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        for key in ("waiting", "terminated"):
            reason = (state.get(key) or {}).get("reason")
            if reason:
                return str(reason)
    return str(status.get("phase") or "Pending")


def _pod_ready(pod: Mapping[str, Any]) -> str:
    containers = (pod.get("spec") or {}).get("containers") or []
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return f"{sum(bool(s.get('ready')) for s in statuses)}/{len(containers)}"


def _restarts(pod: Mapping[str, Any]) -> int:
    status = pod.get("status") or {}
    return sum(int(s.get("restartCount") or 0)
               for s in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])])


def _event_object(event: Mapping[str, Any]) -> str:
    involved = event.get("involvedObject") or {}
    return f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}"


_NAME: Column = ("Name", "string", lambda o: o.get("metadata", {}).get("name"))
_AGE: Column = ("Age", "string", _created)
_BUILT_IN: dict[str, list[Column]] = {
    "Pod": [
        _NAME,
        ("Ready", "string", _pod_ready),
        ("Status", "string", _pod_status),
        ("Restarts", "integer", _restarts),
        _AGE,
        ("IP", "string", lambda p: (p.get("status") or {}).get("podIP") or "<none>"),
    ],
    "Event": [
        ("Last Seen", "string", lambda e: age(e.get("lastTimestamp") or e.get("eventTime")
                                              or e.get("metadata", {}).get("creationTimestamp"))),
        ("Type", "string", lambda e: e.get("type")),
        ("Reason", "string", lambda e: e.get("reason")),
        ("Object", "string", _event_object),
        ("Message", "string", lambda e: e.get("message")),
    ],
}


def _printer_columns(crd_columns: Sequence[Mapping[str, Any]]) -> list[Column]:
    """A CRD's additionalPrinterColumns; date columns print as ages, as the API server does."""
    columns: list[Column] = [_NAME]
    for spec in crd_columns:
        path = spec["jsonPath"]
        if spec.get("type") == "date":
            columns.append((spec["name"], "string", lambda o, p=path: age(_json_path(o, p))))
        else:
            columns.append((spec["name"], spec.get("type", "string"), lambda o, p=path: _json_path(o, p)))
    return columns


def table(
    kind: str, objects: Sequence[Mapping[str, Any]], resource_version: str,
    printer_columns: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A Table of objects of one kind; `printer_columns` are a CRD's, for its custom resources."""
    if printer_columns is not None:
        columns = _printer_columns(printer_columns)
    else:
        columns = _BUILT_IN.get(kind, [_NAME, _AGE])
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [
            {"name": name, "type": type_, "format": "name" if name == "Name" else "", "description": "", "priority": 0}
            for name, type_, _ in columns
        ],
        "rows": [
            {
                "cells": [cell(obj) for _, _, cell in columns],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj.get("metadata", {}),
                },
            }
            for obj in objects
        ],
    }
