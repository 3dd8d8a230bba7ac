"""Two `kvflock operator --peering` processes elect one leader through a kopf peering object; when
the leader is SIGKILLed, the other takes over and reconciles the next change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import kubernetes.client
import pytest
import yaml

from kvflock.operator.render import render_peering_crds

from .conftest import ServerThread, wait_for

NS = "default"
PEERING = "kvflock"
# kopf's keep-alives come every max(1, lifetime - 5..10) seconds: a lifetime of 10 leaves a
# leader 5 s of slack before a follower counts it dead. With 3 (1 s of slack), a leader whose
# event loop stalls on a loaded 2-core machine lost the lead while alive, both replicas acted at
# once, and the test failed about one run in three.
LIFETIME = 10
# The waits below are bounds against hangs: on a 2-core machine shared with other test runs, an
# operator process took over 30 s just to import and join the peering.


def _kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "users": [{"name": "me", "user": {}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "me"}}],
    }))
    return path


def _workers(core: kubernetes.client.CoreV1Api) -> list[str]:
    return sorted(p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="kvflock.dev/role=worker").items)


@pytest.mark.timeout(360)
def test_when_the_leader_is_killed_the_other_operator_takes_over(
    apiserver: ServerThread, api_client: kubernetes.client.ApiClient, tmp_path: Path
) -> None:
    for crd in render_peering_crds():
        apiserver.api.install_crd(crd)
    custom = kubernetes.client.CustomObjectsApi(api_client)
    custom.create_namespaced_custom_object("kopf.dev", "v1", NS, "kopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}})
    kubeconfig = _kubeconfig(tmp_path, apiserver.url)
    operators: dict[str, subprocess.Popen[str]] = {}
    for name in ("op-a", "op-b"):
        log = open(tmp_path / f"{name}.log", "w")
        operators[name] = subprocess.Popen(
            [sys.executable, "-m", "kvflock.cli", "operator", "--kubeconfig", str(kubeconfig), "-n", NS,
             "--peering", PEERING, "--peering-lifetime", str(LIFETIME), "--probe-interval", "1"],
            env={**os.environ, "POD_ID": name}, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        def peers() -> dict[str, dict]:
            body = custom.get_namespaced_custom_object("kopf.dev", "v1", NS, "kopfpeerings", PEERING)
            return dict(body.get("status") or {})

        both = wait_for(lambda: (p := peers()).keys() >= set(operators) and p, 120, "both operators in the peering")
        leader = max(operators, key=lambda n: both[n]["priority"])
        follower = next(n for n in operators if n != leader)

        body = {"apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "chat"},
                "spec": {"resources": {"gpusPerReplica": 0}}}
        custom.create_namespaced_custom_object("kvflock.dev", "v1alpha1", NS, "inferenceservices", body)
        core = kubernetes.client.CoreV1Api(api_client)
        wait_for(lambda: _workers(core) == ["chat-w-0"], 90, "the leader to create the worker")

        operators[leader].send_signal(signal.SIGKILL)
        operators[leader].wait(timeout=10)
        custom.patch_namespaced_custom_object("kvflock.dev", "v1alpha1", NS, "inferenceservices", "chat",
                                              {"spec": {"replicas": 2}})
        wait_for(lambda: _workers(core) == ["chat-w-0", "chat-w-1"], 90, f"{follower} to take over and scale up")
        assert operators[follower].poll() is None, (tmp_path / f"{follower}.log").read_text()[-2000:]
        wait_for(lambda: all(line in (tmp_path / f"{follower}.log").read_text()
                             for line in ("Pausing operations in favour of", "Resuming operations")),
                 30, f"{follower}'s log to show it paused for the leader, then resumed")
    finally:
        for process in operators.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
