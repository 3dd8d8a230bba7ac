"""The operator's LoRA adapter decisions (kvflock.operator.adapters): what each worker loads and
unloads, who counts as serving an adapter, and what the status says; and that adapters never
roll the workers. Pure functions: no cluster, no worker."""

from __future__ import annotations

import datetime
import json

import pytest
from kvflock.operator import adapters, children
from kvflock.operator.adapters import AdapterAction
from kvflock.operator.children import Owner
from kvflock.operator.crd import AdapterSpec, AdapterStatus, Condition, InferenceServiceSpec, InferenceServiceStatus
from kvflock.operator.reconcile import Probe, WorkerPod

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")
NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)


def _adapters(**paths: str) -> list[AdapterSpec]:
    return [AdapterSpec.model_validate({"name": name, "source": {"path": path}}) for name, path in paths.items()]


def _spec(**paths: str) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({
        "engine": {"lora": {}},
        "adapters": [{"name": name, "source": {"path": path}} for name, path in paths.items()],
    })


def test_a_worker_without_the_adapters_loads_each() -> None:
    actions = adapters.plan(_adapters(sql="/a/sql", poetry="/a/poetry"), {"w-0": {}})
    assert actions == [AdapterAction("load", "w-0", "sql", "/a/sql"),
                       AdapterAction("load", "w-0", "poetry", "/a/poetry")]


def test_a_worker_that_has_them_all_does_nothing() -> None:
    assert adapters.plan(_adapters(sql="/a/sql"), {"w-0": {"sql": "/a/sql"}}) == []


def test_an_adapter_removed_from_the_spec_is_unloaded_everywhere() -> None:
    held = {"w-0": {"sql": "/a/sql", "poetry": "/a/poetry"}, "w-1": {"poetry": "/a/poetry"}}
    actions = adapters.plan(_adapters(sql="/a/sql"), held)
    assert actions == [AdapterAction("unload", "w-0", "poetry"), AdapterAction("unload", "w-1", "poetry"),
                       AdapterAction("load", "w-1", "sql", "/a/sql")]


def test_an_adapter_whose_folder_changed_is_unloaded_then_loaded_from_the_new_one() -> None:
    actions = adapters.plan(_adapters(sql="/a/sql-v2"), {"w-0": {"sql": "/a/sql"}})
    assert actions == [AdapterAction("unload", "w-0", "sql"), AdapterAction("load", "w-0", "sql", "/a/sql-v2")]


def test_unloads_come_before_loads_so_slots_free_first() -> None:
    actions = adapters.plan(_adapters(new="/a/new"), {"w-0": {"old": "/a/old"}, "w-1": {"old": "/a/old"}})
    verbs = [a.verb for a in actions]
    assert verbs == sorted(verbs, key=lambda v: v != "unload")


def test_a_restarted_worker_gets_the_adapters_again() -> None:
    pods = [WorkerPod(name="w-0", index=0, phase="Running", ready=True)]
    held = adapters.served(pods, {"w-0": Probe(at=NOW, ready=True, adapters={})})  # it came back with none
    assert adapters.plan(_adapters(sql="/a/sql"), held) == [AdapterAction("load", "w-0", "sql", "/a/sql")]


@pytest.mark.parametrize(("pod", "probe"), [
    (WorkerPod(name="w-0", index=0, phase="Running", ready=False), Probe(at=NOW, adapters={})),
    (WorkerPod(name="w-0", index=0, phase="Running", ready=True, draining_since=NOW), Probe(at=NOW, adapters={})),
    (WorkerPod(name="w-0", index=0, phase="Running", ready=True, terminating=True), Probe(at=NOW, adapters={})),
    (WorkerPod(name="w-0", index=0, phase="Running", ready=True), Probe(at=NOW, error="unreachable")),
    (WorkerPod(name="w-0", index=0, phase="Running", ready=True), None),
], ids=["not ready", "draining", "terminating", "models not read", "not probed"])
def test_workers_that_are_not_ready_and_staying_or_not_read_are_left_alone(pod: WorkerPod, probe: Probe | None) -> None:
    assert adapters.served([pod], {"w-0": probe} if probe else {}) == {}


def test_after_applies_what_succeeded_only() -> None:
    held = {"w-0": {"old": "/a/old"}}
    done = [AdapterAction("unload", "w-0", "old"), AdapterAction("load", "w-0", "sql", "/a/sql")]
    assert adapters.after(held, done) == {"w-0": {"sql": "/a/sql"}}
    assert held == {"w-0": {"old": "/a/old"}}


def test_status_counts_the_workers_that_serve_each_adapter_from_its_folder() -> None:
    held = {"w-0": {"sql": "/a/sql", "poetry": "/old/poetry"}, "w-1": {"sql": "/a/sql"}}
    statuses = adapters.statuses(_adapters(sql="/a/sql", poetry="/a/poetry"), held, {"poetry": "it failed"})
    assert statuses == [AdapterStatus(name="sql", replicas=2),
                        AdapterStatus(name="poetry", replicas=0, error="it failed")]


def _healthy() -> InferenceServiceStatus:
    return InferenceServiceStatus(conditions=[
        Condition(type="Degraded", status="False", reason="Healthy", lastTransitionTime="2026-12-07T11:00:00Z")])


def test_a_failed_load_degrades_the_service_naming_the_adapter_and_the_workers_message() -> None:
    action = AdapterAction("load", "chat-w-0", "sql", "/a/sql")
    message = adapters.failure_message(action, "lora_path: '/a/sql' is not a PEFT adapter folder")
    status = adapters.with_adapters(_healthy(), [AdapterStatus(name="sql", error=message)], [], NOW, 3)
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "AdapterLoadFailed")
    assert "'sql'" in degraded.message and "chat-w-0" in degraded.message and "not a PEFT adapter" in degraded.message
    again = adapters.with_adapters(_healthy(), [AdapterStatus(name="sql", error=message)], status.conditions,
                                   NOW + datetime.timedelta(seconds=5), 3)
    assert again == status  # no new transition while it keeps failing


def test_a_worse_problem_keeps_its_degraded_reason() -> None:
    crashed = InferenceServiceStatus(conditions=[Condition(type="Degraded", status="True", reason="WorkerCrashed")])
    status = adapters.with_adapters(crashed, [AdapterStatus(name="sql", error="failed")], [], NOW, 1)
    assert [c.reason for c in status.conditions] == ["WorkerCrashed"]
    assert status.adapters == [AdapterStatus(name="sql", error="failed")]


def test_adding_or_removing_adapters_does_not_change_what_the_workers_run() -> None:
    none, two, other = _spec(), _spec(sql="/a/sql", poetry="/a/poetry"), _spec(french="/a/french")
    hashes = {children.spec_hash(OWNER, s) for s in (none, two, other)}
    configs = {children.engine_configmap(OWNER, s)["data"]["engine.json"] for s in (none, two, other)}
    assert len(hashes) == 1 and len(configs) == 1


def test_turning_lora_on_rolls_the_workers_once() -> None:
    off = InferenceServiceSpec()
    assert children.spec_hash(OWNER, off) != children.spec_hash(OWNER, _spec())


def test_a_starting_worker_loads_the_adapters_its_engine_configmap_lists() -> None:
    spec = _spec(sql="/a/sql", poetry="/a/poetry")
    data = children.engine_configmap(OWNER, spec)["data"]
    assert json.loads(data["adapters.json"]) == {"sql": "/a/sql", "poetry": "/a/poetry"}
    command = children.worker_template(OWNER, spec)["containers"][0]["command"]
    assert command[command.index("--lora-modules-file") + 1] == "/etc/kvflock/adapters.json"
    without = InferenceServiceSpec()
    assert "adapters.json" not in children.engine_configmap(OWNER, without)["data"]
    assert "--lora-modules-file" not in children.worker_template(OWNER, without)["containers"][0]["command"]
