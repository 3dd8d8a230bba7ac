"""The local cluster's pure parts: command rewriting, kubectl's ages and Tables, process groups."""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

from kvflock.local.kubelet import rewrite_listen_args
from kvflock.local.process import ManagedProcess, kill_leftovers
from kvflock.local.tables import age, table, wants_table

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def _ago(seconds: int) -> str:
    return (NOW - datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_container_port_and_host_become_the_local_ones() -> None:
    argv = ["kvflock", "serve", "--model", "demo", "--host", "0.0.0.0", "--port", "8000", "--dtype", "float32"]
    assert rewrite_listen_args(argv, {8000: 41234}) == [
        "kvflock", "serve", "--model", "demo", "--host", "127.0.0.1", "--port", "41234", "--dtype", "float32"]
    assert rewrite_listen_args(["srv", "--port=8000"], {8000: 5}) == ["srv", "--port", "5", "--host", "127.0.0.1"]


def test_a_listening_address_is_added_when_the_command_has_none() -> None:
    assert rewrite_listen_args(["srv"], {8000: 5}) == ["srv", "--port", "5", "--host", "127.0.0.1"]
    assert rewrite_listen_args(["job", "--x"], {}) == ["job", "--x"]


def test_ages_read_like_kubectl() -> None:
    cases = {30: "30s", 150: "2m30s", 600: "10m", 3 * 3600 + 300: "3h5m", 20 * 3600: "20h", 3 * 86400: "3d"}
    for seconds, expected in cases.items():
        assert age(_ago(seconds), NOW) == expected
    assert age(None) == "<unknown>"


def test_pods_are_tabled_with_ready_status_and_restarts() -> None:
    pod = {
        "metadata": {"name": "w-0", "creationTimestamp": _ago(5)},
        "spec": {"containers": [{"name": "worker"}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [
            {"ready": False, "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
    }
    result = table("Pod", [pod], "7")
    assert [c["name"] for c in result["columnDefinitions"]] == ["Name", "Ready", "Status", "Restarts", "Age", "IP"]
    assert result["rows"][0]["cells"][:4] == ["w-0", "0/1", "CrashLoopBackOff", 2]


def test_only_table_accept_headers_ask_for_tables() -> None:
    assert wants_table("application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
    assert not wants_table("application/json")


def test_stopping_a_process_ends_its_children_and_its_pid_file(tmp_path: Path) -> None:
    script = "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; " \
             "time.sleep(60)']); print('started', child.pid, flush=True); time.sleep(60)"
    process = ManagedProcess([sys.executable, "-c", script], dict(os.environ), tmp_path / "p.log", tmp_path,
                             tmp_path / "pids")
    process.start()
    deadline = time.monotonic() + 10
    while "started" not in (tmp_path / "p.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int((tmp_path / "p.log").read_text().split()[-1])
    assert list((tmp_path / "pids").iterdir())
    assert process.stop(grace_seconds=5) == 128 + 15
    assert not list((tmp_path / "pids").iterdir())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)


def _running(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_leftovers_are_killed_only_when_the_pid_still_runs_the_recorded_command(tmp_path: Path) -> None:
    process = ManagedProcess([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                             tmp_path / "p.log", tmp_path, tmp_path / "pids")
    process.start()
    time.sleep(0.2)
    (tmp_path / "pids" / str(os.getpid())).write_text("not this test's command line")
    assert kill_leftovers(tmp_path / "pids") == [process.pid]
    assert process.stop(grace_seconds=1) == 128 + 9
    assert not list((tmp_path / "pids").iterdir())
