"""The process kubelet against the API server: pods as local processes, reported back into
their status (small stand-in containers, no model)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from kvflock.local.kubelet import ProcessKubelet, worker_cores
from kvflock.operator.children import container_security_context, pod_security_context
from tests.operator.conftest import ServerThread, wait_for

# A container that serves GET /ready on the --port it is given and prints its environment's POD_NAME.
SERVER = """
import http.server, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
print("serving", os.environ.get("POD_NAME"), sys.argv[sys.argv.index("--host") + 1], flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def core(tmp_path: Path) -> Iterator[tuple[kubernetes.client.CoreV1Api, ProcessKubelet]]:
    server = ServerThread()
    server.start()
    configuration = kubernetes.client.Configuration()
    configuration.host = server.url
    client = kubernetes.client.ApiClient(configuration)
    kubelet = ProcessKubelet(client, tmp_path, pid_dir=tmp_path / "pids")
    kubelet.start()
    yield kubernetes.client.CoreV1Api(client), kubelet
    kubelet.stop()
    client.close()
    server.stop()


def _pod(name: str, command: list[str], probe: bool = True, restart: str = "Always") -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main", "image": "local", "command": command,
        "ports": [{"name": "http", "containerPort": 8000}],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
    }
    if probe:
        container["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1}
    return {"metadata": {"name": name}, "spec": {"containers": [container], "restartPolicy": restart,
                                                 "terminationGracePeriodSeconds": 5}}


def _status(core: kubernetes.client.CoreV1Api, name: str) -> dict[str, Any]:
    pod = core.api_client.sanitize_for_serialization(core.read_namespaced_pod(name, "default"))
    return {**pod.get("status", {}), "annotations": pod["metadata"].get("annotations") or {}}


def _ready(status: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])


def _when(api: kubernetes.client.CoreV1Api, name: str, predicate: Any) -> Any:
    """A check for `wait_for`: the pod's status once `predicate` holds for it."""
    def check() -> dict[str, Any] | None:
        status = _status(api, name)
        return status if predicate(status) else None
    return check


def _pid(status: dict[str, Any]) -> int:
    return int(status["containerStatuses"][0]["containerID"].removeprefix("process://"))


def test_a_pod_runs_as_a_process_on_its_own_port_and_turns_ready(core: Any, tmp_path: Path) -> None:
    api, _ = core
    api.create_namespaced_pod("default", _pod("web", [sys.executable, "-c", SERVER, "--port", "8000"]))
    status = wait_for(_when(api, "web", _ready), 20, what="web Ready")
    assert status["phase"] == "Running" and status["podIP"] == "127.0.0.1"
    assert status["annotations"]["kvflock.dev/endpoint"].startswith("http://127.0.0.1:")
    log = (tmp_path / "logs" / "default_web_main.log").read_text()
    assert "serving web 127.0.0.1" in log


def test_a_killed_container_is_restarted_and_counted(core: Any) -> None:
    api, _ = core
    api.create_namespaced_pod("default", _pod("web", [sys.executable, "-c", SERVER]))
    first = wait_for(_when(api, "web", _ready), 20, what="web Ready")
    os.kill(_pid(first), signal.SIGKILL)
    again = wait_for(_when(api, "web", lambda s: _ready(s) and _pid(s) != _pid(first)), 20,
                     what="web restarted and Ready")
    container = again["containerStatuses"][0]
    assert container["restartCount"] == 1
    assert container["lastState"]["terminated"]["exitCode"] == 137


def test_a_crashing_container_backs_off_with_its_error_in_the_message(core: Any) -> None:
    api, _ = core
    crash = [sys.executable, "-c", "import sys; print('ValueError: no such model: /x', flush=True); sys.exit(3)"]
    api.create_namespaced_pod("default", _pod("crash", crash, probe=False))

    def backing_off() -> dict[str, Any] | None:
        container = (_status(api, "crash").get("containerStatuses") or [{}])[0]
        waiting = (container.get("state") or {}).get("waiting") or {}
        return container if waiting.get("reason") == "CrashLoopBackOff" else None

    container = wait_for(backing_off, 20, what="CrashLoopBackOff")
    assert "no such model: /x" in container["state"]["waiting"]["message"]
    assert container["lastState"]["terminated"]["exitCode"] == 3

    def back_off_event() -> bool:  # posted after the status that shows the back-off
        events = api.list_namespaced_event("default", field_selector="involvedObject.name=crash").items
        return any(e.reason == "BackOff" and "no such model" in e.message for e in events)

    wait_for(back_off_event, 10, what="a BackOff Event with the container's error")


def test_a_pod_that_never_restarts_ends_failed(core: Any) -> None:
    api, _ = core
    api.create_namespaced_pod("default", _pod("job", [sys.executable, "-c", "raise SystemExit(2)"],
                                              probe=False, restart="Never"))
    status = wait_for(_when(api, "job", lambda s: s.get("phase") == "Failed"), 20, what="Failed")
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 2


def test_deleting_a_pod_stops_its_process(core: Any, tmp_path: Path) -> None:
    api, kubelet = core
    api.create_namespaced_pod("default", _pod("web", [sys.executable, "-c", SERVER]))
    status = wait_for(_when(api, "web", _ready), 20, what="web Ready")
    pid = _pid(status)
    api.delete_namespaced_pod("web", "default")
    wait_for(lambda: not kubelet.processes(), 15, what="the process to end")
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}/cmdline").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not list((tmp_path / "pids").iterdir())


# A container that takes 3 s to end after SIGTERM (within its grace period of 5 s), as kopf takes a moment.
SLOW_TO_STOP = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (time.sleep(3), sys.exit(0)));"
                " print('up', flush=True); time.sleep(600)")


def test_stopping_the_kubelet_ends_the_process_of_a_pod_deleted_just_before(core: Any, tmp_path: Path) -> None:
    api, kubelet = core
    api.create_namespaced_pod("default", _pod("slow", [sys.executable, "-c", SLOW_TO_STOP], probe=False))
    pid = _pid(wait_for(_when(api, "slow", lambda s: s.get("phase") == "Running"), 20, what="slow Running"))
    api.delete_namespaced_pod("slow", "default")

    def stopping() -> bool:
        events = api.list_namespaced_event("default", field_selector="involvedObject.name=slow").items
        return any(e.reason == "Killing" for e in events)

    wait_for(stopping, 15, what="the kubelet to stop the deleted pod")
    assert kubelet.processes() == {"default/slow": pid}  # still ending: SIGTERMed, not yet gone
    kubelet.stop()
    assert not kubelet.processes() and not list((tmp_path / "pids").iterdir())
    assert not Path(f"/proc/{pid}/cmdline").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


# A container that prints the thread counts it was given, then idles.
THREADS = ("import os, time; print('threads', os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], flush=True);"
           " time.sleep(600)")


def _compute_pod(name: str, role: str = "worker", cpu_limit: str | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "local", "command": [sys.executable, "-c", THREADS]}
    if cpu_limit:
        container["resources"] = {"limits": {"cpu": cpu_limit}}
    return {"metadata": {"name": name, "labels": {"kvflock.dev/role": role}},
            "spec": {"containers": [container], "terminationGracePeriodSeconds": 1}}


def _threads(tmp_path: Path, name: str, starts: int = 1) -> int:
    """The thread count that the `starts`-th run of a pod's container was given."""
    log = tmp_path / "logs" / f"default_{name}_main.log"

    def given() -> list[str] | None:
        lines = [line.split() for line in log.read_text().splitlines() if line.startswith("threads")] \
            if log.exists() else []
        return lines[starts - 1] if len(lines) >= starts else None

    _, omp, mkl = wait_for(given, 20, what=f"{name} to start (run {starts})")
    assert omp == mkl
    return int(omp)


def test_workers_divide_the_cores_and_a_cpu_limit_caps_the_share(core: Any, tmp_path: Path) -> None:
    api, _ = core
    cores = worker_cores()
    api.create_namespaced_pod("default", _compute_pod("w-0"))
    assert _threads(tmp_path, "w-0") == cores
    api.create_namespaced_pod("default", _compute_pod("w-1"))
    assert _threads(tmp_path, "w-1") == max(1, cores // 2)
    api.create_namespaced_pod("default", _compute_pod("w-2", cpu_limit="500m"))
    assert _threads(tmp_path, "w-2") == 1


def test_a_restarted_worker_takes_its_share_of_the_cores_then(core: Any, tmp_path: Path) -> None:
    api, _ = core
    api.create_namespaced_pod("default", _compute_pod("w-0"))
    assert _threads(tmp_path, "w-0") == worker_cores()
    api.create_namespaced_pod("default", _compute_pod("w-1"))
    _threads(tmp_path, "w-1")
    running = wait_for(_when(api, "w-0", lambda s: s.get("containerStatuses")), 20, what="w-0 running")
    os.kill(_pid(running), signal.SIGKILL)
    assert _threads(tmp_path, "w-0", starts=2) == max(1, worker_cores() // 2)


def test_a_router_takes_one_thread_and_no_share(core: Any, tmp_path: Path) -> None:
    api, _ = core
    api.create_namespaced_pod("default", _compute_pod("router", role="router"))
    assert _threads(tmp_path, "router") == 1
    api.create_namespaced_pod("default", _compute_pod("w-0"))
    assert _threads(tmp_path, "w-0") == worker_cores()


def test_a_restricted_security_context_is_ignored_and_the_pod_runs(core: Any) -> None:
    api, _ = core
    pod = _pod("web", [sys.executable, "-c", SERVER])
    pod["spec"]["securityContext"] = pod_security_context()
    pod["spec"]["containers"][0]["securityContext"] = {**container_security_context(), "readOnlyRootFilesystem": True}
    api.create_namespaced_pod("default", pod)
    wait_for(_when(api, "web", _ready), 20, what="web Ready")
