"""The process kubelet's init containers: run in order, each to completion, before the container;
a failing one restarted with back-off (or failing the pod with restartPolicy Never), its state in
the pod's initContainerStatuses as the real kubectl reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvflock.local.localcluster import write_kubeconfig
from tests.integration.test_kubelet import SERVER, _pod, _ready, _status, _when, core  # noqa: F401  (the fixture)
from tests.operator.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

KUBECTL = Path(sys.executable).parent / "kubectl"
# Appends its name to the shared folder's file, after checking that the step before it ran.
STEP = "import sys; f = open(sys.argv[1] + '/steps', 'a+'); f.seek(0); assert f.read() == sys.argv[2]; f.write(sys.argv[3])"


def _with_init(pod: dict[str, Any], *init: dict[str, Any]) -> dict[str, Any]:
    """`pod` with these init containers and an emptyDir `shared` mounted at /shared in all of them."""
    mount = [{"name": "shared", "mountPath": "/shared"}]
    spec = pod["spec"]
    spec["containers"][0]["volumeMounts"] = mount
    spec["initContainers"] = [{"image": "local", "volumeMounts": mount, **c} for c in init]
    spec["volumes"] = [{"name": "shared", "emptyDir": {}}]
    return pod


def _step(name: str, before: str) -> dict[str, Any]:
    return {"name": name, "command": [sys.executable, "-c", STEP, "/shared", before, name[-1]]}


def _init_state(status: dict[str, Any]) -> dict[str, Any]:
    """The first init container's state, {} before the kubelet reported one."""
    return ((status.get("initContainerStatuses") or [{}])[0]).get("state") or {}


def _kubectl_status(api: Any, tmp_path: Path, name: str) -> str:
    """The STATUS column of `kubectl get pod`."""
    if not KUBECTL.exists():
        pytest.skip(f"needs the real kubectl at {KUBECTL} (make venv installs it)")
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, api.api_client.configuration.host)
    done = subprocess.run([str(KUBECTL), "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp_path / "kube-cache"),
                           "get", "pod", name, "--no-headers"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[2]


def test_init_containers_run_in_order_to_completion_before_the_container(core: Any, tmp_path: Path) -> None:
    api, _ = core
    server = _pod("web", [sys.executable, "-c", SERVER])
    api.create_namespaced_pod("default", _with_init(server, _step("init-1", ""), _step("init-2", "1")))
    status = wait_for(_when(api, "web", _ready), 30, what="web Ready after its init containers")
    assert [s["name"] for s in status["initContainerStatuses"]] == ["init-1", "init-2"]
    for init in status["initContainerStatuses"]:
        assert init["state"]["terminated"]["exitCode"] == 0 and init["state"]["terminated"]["reason"] == "Completed"
        assert init["ready"] and init["restartCount"] == 0
    assert {"type": "Initialized", "status": "True"}.items() <= \
        next(c for c in status["conditions"] if c["type"] == "Initialized").items()
    (steps,) = (tmp_path / "pods").glob("default_web/volumes/shared/steps")
    assert steps.read_text() == "12"
    assert _kubectl_status(api, tmp_path, "web") == "Running"


def test_the_pod_waits_pending_while_an_init_container_runs(core: Any, tmp_path: Path) -> None:
    api, _ = core
    release = tmp_path / "release"
    wait = {"name": "fetch", "command": [sys.executable, "-c",
                                          f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.05)"]}
    api.create_namespaced_pod("default", _with_init(_pod("web", [sys.executable, "-c", SERVER]), wait))
    status = wait_for(_when(api, "web", lambda s: "running" in _init_state(s)), 20,
                      what="the init container running")
    assert status["phase"] == "Pending"
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}
    initialized = next(c for c in status["conditions"] if c["type"] == "Initialized")
    assert initialized["status"] == "False" and initialized["message"] == "containers with incomplete status: [fetch]"
    assert _kubectl_status(api, tmp_path, "web") == "Init:0/1"
    release.touch()
    wait_for(_when(api, "web", _ready), 30, what="web Ready once its init container completed")


def test_a_failing_init_container_backs_off_and_the_container_never_starts(core: Any, tmp_path: Path) -> None:
    api, _ = core
    fail = {"name": "fetch", "command": [sys.executable, "-c", "print('the Hub refused access (401)'); raise SystemExit(1)"]}
    api.create_namespaced_pod("default", _with_init(_pod("web", [sys.executable, "-c", SERVER]), fail))

    def backing_off(status: dict[str, Any]) -> bool:
        return (_init_state(status).get("waiting") or {}).get("reason") == "CrashLoopBackOff"

    status = wait_for(_when(api, "web", backing_off), 30, what="Init:CrashLoopBackOff")
    init = status["initContainerStatuses"][0]
    assert init["restartCount"] == 1 and init["lastState"]["terminated"]["exitCode"] == 1
    assert "the Hub refused access (401)" in init["state"]["waiting"]["message"]
    assert status["phase"] == "Pending" and status["containerStatuses"][0]["restartCount"] == 0
    assert not (tmp_path / "logs" / "default_web_main.log").exists()
    assert _kubectl_status(api, tmp_path, "web") == "Init:CrashLoopBackOff"
    events = api.list_namespaced_event("default", field_selector="involvedObject.name=web").items
    assert any(e.reason == "BackOff" and e.involved_object.field_path == "spec.initContainers{fetch}" for e in events)


def test_a_failing_init_container_fails_a_pod_that_never_restarts(core: Any, tmp_path: Path) -> None:
    api, _ = core
    fail = {"name": "fetch", "command": [sys.executable, "-c", "raise SystemExit(4)"]}
    pod = _with_init(_pod("job", [sys.executable, "-c", "print('ran')"], probe=False, restart="Never"), fail)
    api.create_namespaced_pod("default", pod)
    status = wait_for(_when(api, "job", lambda s: s.get("phase") == "Failed"), 20, what="Failed")
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 4
    assert _kubectl_status(api, tmp_path, "job") == "Init:Error"
    assert not os.path.exists(tmp_path / "logs" / "default_job_main.log")
