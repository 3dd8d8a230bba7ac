"""Which LoRA adapters each worker loads or unloads, and what the status says of them.

`spec.adapters` is the source of truth; each ready worker's /metrics, read with its probe, says
what it serves (each adapter's name and folder). `plan` diffs the two: load what a worker lacks,
unload what the spec no longer names, and unload then load an adapter whose folder changed. None
of this is in the pod template or the engine config file, so it never rolls a worker. /metrics
rather than /v1/models: it is read anyway, and a worker logs every /v1 call, which polling would
fill its log with.

A worker that restarts loads, before it reports Ready, the adapters its engine ConfigMap's
`adapters.json` lists (kvflock.operator.children): with a single replica, a request for an
adapter would otherwise meet a worker without it, and get 404, until the next probe period. A
kubelet refreshes a mounted ConfigMap a minute or so after it changes, so that list may be a
little old: the next probe period's pass corrects whatever it missed, as it does for running
workers. The router sends an adapter's requests only to workers whose /metrics lists it. Pure
functions; the handlers call the workers.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kvflock.operator.crd import AdapterSpec, AdapterStatus, Condition, InferenceServiceStatus
from kvflock.operator.reconcile import Probe, WorkerPod, format_time

REASON_LOAD_FAILED = "AdapterLoadFailed"
# What the workers serve: worker -> adapter -> its folder.
Held = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class AdapterAction:
    """Load `adapter` from `path` into `worker`, or unload it."""

    verb: Literal["load", "unload"]
    worker: str
    adapter: str
    path: str | None = None


def served(pods: Sequence[WorkerPod], probes: Mapping[str, Probe]) -> dict[str, dict[str, str]]:
    """What each ready, staying worker serves (adapter -> folder), where its adapters were read."""
    result = {}
    for pod in pods:
        probe = probes.get(pod.name)
        if pod.ready and not pod.terminating and pod.draining_since is None and probe is not None \
                and probe.adapters is not None:
            result[pod.name] = dict(probe.adapters)
    return result


def plan(adapters: Sequence[AdapterSpec], held: Held) -> list[AdapterAction]:
    """The loads and unloads that give every worker in `held` exactly `adapters`, unloads first
    (they free the worker's slots)."""
    desired = {a.name: a.source.path for a in adapters}
    unloads, loads = [], []
    for worker, has in sorted(held.items()):
        unloads += [AdapterAction("unload", worker, name) for name, path in sorted(has.items())
                    if name not in desired or desired[name] != path]
        loads += [AdapterAction("load", worker, name, path) for name, path in desired.items() if has.get(name) != path]
    return unloads + loads


def after(held: Held, done: Sequence[AdapterAction]) -> dict[str, dict[str, str]]:
    """What the workers serve once the actions in `done` succeeded."""
    result = {worker: dict(has) for worker, has in held.items()}
    for action in done:
        if action.verb == "unload":
            result[action.worker].pop(action.adapter, None)
        elif action.path is not None:
            result[action.worker][action.adapter] = action.path
    return result


def statuses(adapters: Sequence[AdapterSpec], held: Held, failures: Mapping[str, str]) -> list[AdapterStatus]:
    """Per adapter of the spec: how many workers serve it from its folder, and its last failure."""
    return [AdapterStatus(name=a.name, replicas=sum(has.get(a.name) == a.source.path for has in held.values()),
                          error=failures.get(a.name)) for a in adapters]


def failure_message(action: AdapterAction, problem: str) -> str:
    return f"worker {action.worker}: loading adapter {action.adapter!r} from {action.path} failed: {problem}"


def with_adapters(status: InferenceServiceStatus, adapters: list[AdapterStatus], previous: Sequence[Condition],
                  now: datetime.datetime, generation: int | None) -> InferenceServiceStatus:
    """`status` with the adapters' counts, Degraded (AdapterLoadFailed, naming each adapter and
    the worker's message) while some adapter fails to load and nothing worse is wrong."""
    failed = [a for a in adapters if a.error]
    conditions = status.conditions
    degraded = next((c for c in conditions if c.type == "Degraded"), None)
    if failed and (degraded is None or degraded.status != "True"):
        before = next((c for c in previous if c.type == "Degraded" and c.reason == REASON_LOAD_FAILED), None)
        condition = Condition(
            type="Degraded", status="True", reason=REASON_LOAD_FAILED, message="; ".join(a.error or "" for a in failed),
            lastTransitionTime=before.lastTransitionTime if before else format_time(now), observedGeneration=generation,
        )
        conditions = [c for c in conditions if c.type != "Degraded"] + [condition]
    return status.model_copy(update={"adapters": adapters, "conditions": conditions})
