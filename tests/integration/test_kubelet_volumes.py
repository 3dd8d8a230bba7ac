"""The process kubelet's volumes: Secrets, ConfigMaps and emptyDirs written into the pod's folder,
the container's mount paths pointed there, a missing Secret reported as FailedMount until it exists."""

from __future__ import annotations

import base64
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from kvflock.local import volumes
from tests.integration.test_kubelet import _status, _when, core  # noqa: F401  (the fixture)
from tests.operator.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

# Reads the files its arguments and env name (through their mount paths), says what it found.
READER = """
import os, sys
key = open(sys.argv[1]).read()
conf = open(os.environ["CONF"]).read()
scratch = sys.argv[2].partition("=")[2]
open(os.path.join(scratch, "note"), "w").write("x")
print("key-ok" if key == "s3cret-value" else "key-wrong", "conf=" + conf, "scratch-ok", flush=True)
import time; time.sleep(60)
"""


def test_rewrite_points_mount_paths_and_flag_values_at_the_folders() -> None:
    mounts = {"/etc/kvflock": Path("/p/engine"), "/etc/kvflock-auth": Path("/p/keys")}
    assert volumes.rewrite("/etc/kvflock-auth/api-keys", mounts) == "/p/keys/api-keys"
    assert volumes.rewrite("/etc/kvflock/engine.json", mounts) == "/p/engine/engine.json"
    assert volumes.rewrite("--path=/etc/kvflock", mounts) == "--path=/p/engine"
    assert volumes.rewrite("/etc/kvflockx/a", mounts) == "/etc/kvflockx/a"
    assert volumes.rewrite("demo", mounts) == "demo"


def test_materialize_writes_items_with_private_modes_and_refuses_missing_keys(tmp_path: Path) -> None:
    data = {("Secret", "keys"): {"k": b"v1", "other": b"v2"}}
    secret = {"name": "s", "secret": {"secretName": "keys", "items": [{"key": "k", "path": "file"}]}}
    folders = volumes.materialize([secret], tmp_path, lambda kind, name: data.get((kind, name)))
    assert volumes.mount_points([{"name": "s", "mountPath": "/etc/s/"}], folders) == {"/etc/s": tmp_path / "s"}
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["file"]
    assert stat.S_IMODE((tmp_path / "s" / "file").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    missing_key = {"name": "s", "secret": {"secretName": "keys", "items": [{"key": "nope"}]}}
    with pytest.raises(volumes.MountError, match="has no key 'nope'"):
        volumes.materialize([missing_key], tmp_path, lambda kind, name: data.get((kind, name)))
    with pytest.raises(volumes.MountError, match="Secret 'gone' not found"):
        volumes.materialize([{"name": "g", "secret": {"secretName": "gone"}}], tmp_path, lambda k, n: None)


def test_a_host_path_volume_is_the_machines_folder_made_or_checked_as_its_type_asks(tmp_path: Path) -> None:
    cache = tmp_path / "node" / "hub"
    folders = volumes.materialize([{"name": "c", "hostPath": {"path": str(cache), "type": "DirectoryOrCreate"}}],
                                  tmp_path / "pod", lambda kind, name: None)
    assert folders == {"c": cache} and cache.is_dir()
    absent = {"name": "m", "hostPath": {"path": str(tmp_path / "absent"), "type": "Directory"}}
    with pytest.raises(volumes.MountError, match="volume 'm': hostPath type check failed: .*absent is not a directory"):
        volumes.materialize([absent], tmp_path / "pod", lambda kind, name: None)


def _reader_pod() -> dict[str, Any]:
    container = {
        "name": "main", "image": "local",
        "command": [sys.executable, "-c", READER, "/etc/app-keys/key", "--scratch=/scratch"],
        "env": [{"name": "CONF", "value": "/etc/app/conf.json"}],
        "volumeMounts": [{"name": "keys", "mountPath": "/etc/app-keys", "readOnly": True},
                         {"name": "conf", "mountPath": "/etc/app", "readOnly": True},
                         {"name": "scratch", "mountPath": "/scratch"}],
    }
    return {"metadata": {"name": "reader"}, "spec": {
        "containers": [container], "restartPolicy": "Always", "terminationGracePeriodSeconds": 2,
        "volumes": [{"name": "keys", "secret": {"secretName": "app-keys", "items": [{"key": "api", "path": "key"}]}},
                    {"name": "conf", "configMap": {"name": "app-conf"}},
                    {"name": "scratch", "emptyDir": {}}]}}


def test_pod_waits_in_failed_mount_for_its_secret_then_reads_its_volumes(core: Any, tmp_path: Path) -> None:
    api, _ = core
    api.create_namespaced_config_map("default", {"metadata": {"name": "app-conf"}, "data": {"conf.json": "{}"}})
    api.create_namespaced_pod("default", _reader_pod())

    def waiting(status: dict[str, Any]) -> bool:
        state = ((status.get("containerStatuses") or [{}])[0].get("state") or {}).get("waiting") or {}
        return "app-keys" in state.get("message", "") and state.get("reason") == "ContainerCreating"

    wait_for(_when(api, "reader", waiting), 20, what="ContainerCreating for the missing Secret")

    def failed_mount() -> bool:
        events = api.list_namespaced_event("default", field_selector="involvedObject.name=reader").items
        return any(e.reason == "FailedMount" and "Secret 'app-keys' not found" in e.message for e in events)

    wait_for(failed_mount, 20, what="a FailedMount Event naming the Secret")

    api.create_namespaced_secret("default", {"metadata": {"name": "app-keys"},
                                             "data": {"api": base64.b64encode(b"s3cret-value").decode()}})
    log = tmp_path / "logs" / "default_reader_main.log"
    wait_for(lambda: log.exists() and "scratch-ok" in log.read_text(), 20, what="the reader's line")
    assert "key-ok conf={} scratch-ok" in log.read_text()
    assert _status(api, "reader")["phase"] == "Running"
    key_file = tmp_path / "pods" / "default_reader" / "volumes" / "keys" / "key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
