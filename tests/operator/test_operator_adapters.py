"""The real operator under kopf against the API server, with LoRA adapters: it loads `spec.adapters`
into every ready worker and unloads removed ones through the workers' endpoints (fake workers here,
which serve what they were told to), never touching the pods, and reports each adapter in the
status, a failed load as Degraded with an Event."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import wait_for
from .test_operator import Cluster, cluster, operator  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(90)


def _spec(**paths: str) -> dict[str, Any]:
    return {"replicas": 2, "resources": {"gpusPerReplica": 0}, "engine": {"lora": {}},
            "adapters": [{"name": name, "source": {"path": path}} for name, path in paths.items()]}


def _adapters(cluster: Cluster) -> dict[str, int]:
    return {a["name"]: a["replicas"] for a in (cluster.service("chat").get("status") or {}).get("adapters") or []}


def _pod_uids(cluster: Cluster) -> dict[str, str]:
    return {name: pod.metadata.uid for name, pod in cluster.pods("chat").items()}


def _start(cluster: Cluster, **paths: str) -> dict[str, str]:
    cluster.workers.adapters.update({"chat-w-0": {}, "chat-w-1": {}})  # workers with LoRA on, none loaded yet
    cluster.create("chat", _spec(**paths))
    cluster.wait_ready("chat", 2)
    return _pod_uids(cluster)


def test_adapters_are_loaded_into_every_ready_worker_and_counted(cluster: Cluster) -> None:
    _start(cluster, sql="/a/sql", poetry="/a/poetry")
    wait_for(lambda: _adapters(cluster) == {"sql": 2, "poetry": 2}, what="both adapters on both workers")
    assert cluster.workers.adapters["chat-w-0"] == {"sql": "/a/sql", "poetry": "/a/poetry"}
    workers = cluster.service("chat")["status"]["workers"]
    assert all(w["adapters"] == {"poetry": "/a/poetry", "sql": "/a/sql"} for w in workers)
    wait_for(lambda: len(cluster.events("AdapterLoaded")) == 4, what="an Event per load")


def test_changing_the_adapters_loads_and_unloads_without_touching_the_pods(cluster: Cluster) -> None:
    uids = _start(cluster, sql="/a/sql", poetry="/a/poetry")
    wait_for(lambda: _adapters(cluster) == {"sql": 2, "poetry": 2}, what="the first adapters")
    cluster.patch_spec("chat", {"adapters": [{"name": "sql", "source": {"path": "/a/sql"}},
                                             {"name": "french", "source": {"path": "/a/french"}}]})
    wait_for(lambda: _adapters(cluster) == {"sql": 2, "french": 2}, what="french in, poetry out")
    assert all(sorted(cluster.workers.adapters[w]) == ["french", "sql"] for w in ("chat-w-0", "chat-w-1"))
    wait_for(lambda: len(cluster.events("AdapterUnloaded")) == 2, what="an Event per unload")
    assert _pod_uids(cluster) == uids
    assert cluster.condition("chat", "Progressing")["status"] == "False"  # nothing rolled


def test_a_new_folder_for_an_adapter_reloads_it(cluster: Cluster) -> None:
    _start(cluster, sql="/a/sql")
    wait_for(lambda: _adapters(cluster) == {"sql": 2}, what="sql loaded")
    cluster.patch_spec("chat", {"adapters": [{"name": "sql", "source": {"path": "/a/sql-v2"}}]})
    wait_for(lambda: all(w["adapters"] == {"sql": "/a/sql-v2"} for w in cluster.service("chat")["status"]["workers"]),
             what="sql loaded from its new folder")
    loads = [body["lora_path"] for path, body, _ in cluster.workers.adapter_calls if path == "load_lora_adapter"]
    assert loads.count("/a/sql-v2") == 2


def test_a_restarted_worker_gets_its_adapters_again(cluster: Cluster) -> None:
    _start(cluster, sql="/a/sql")
    wait_for(lambda: _adapters(cluster) == {"sql": 2}, what="sql loaded")
    cluster.workers.adapters["chat-w-1"] = {}  # it restarted without them (say its adapters.json was not current)
    wait_for(lambda: cluster.workers.adapters["chat-w-1"] == {"sql": "/a/sql"}, what="sql loaded again")
    assert _adapters(cluster) == {"sql": 2}


def test_a_failed_load_is_degraded_naming_the_adapter_with_an_event_and_the_others_serve(cluster: Cluster) -> None:
    _start(cluster, sql="/a/sql", broken="/missing")
    wait_for(lambda: cluster.condition("chat", "Degraded").get("reason") == "AdapterLoadFailed", what="Degraded")
    message = cluster.condition("chat", "Degraded")["message"]
    assert "'broken'" in message and "/missing" in message and "is not a PEFT adapter folder" in message
    assert any("'broken'" in m for m in wait_for(lambda: cluster.events("AdapterLoadFailed"), what="the Event"))
    wait_for(lambda: _adapters(cluster) == {"sql": 2, "broken": 0}, what="sql on both workers")
    cluster.patch_spec("chat", {"adapters": [{"name": "sql", "source": {"path": "/a/sql"}}]})
    wait_for(lambda: cluster.condition("chat", "Degraded").get("status") == "False", what="Degraded to clear")
