"""`kvflock operator`: a real process with a kubeconfig, against the API server on 127.0.0.1."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes.client
import pytest
import yaml

from .conftest import ServerThread, wait_for


def test_cli_starts_without_importing_the_operator() -> None:
    code = "import sys, kvflock.cli; print(sorted(m for m in ('kopf', 'kubernetes', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.timeout(60)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_operator_command_serves_a_cluster_from_a_kubeconfig(
    apiserver: ServerThread, api_client: kubernetes.client.ApiClient, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": apiserver.url}}],
        "users": [{"name": "me", "user": {"token": "secret"}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "me"}}],
    }))
    health_port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "kvflock.cli", "operator", "--kubeconfig", str(kubeconfig), "-n", "default", "-q",
               "--health-port", str(health_port), "--metrics-port", str(metrics_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        custom = kubernetes.client.CustomObjectsApi(api_client)
        body = {"apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "cli"},
                "spec": {"resources": {"gpusPerReplica": 0}}}
        custom.create_namespaced_custom_object("kvflock.dev", "v1alpha1", "default", "inferenceservices", body)
        core = kubernetes.client.CoreV1Api(api_client)
        wait_for(lambda: sorted(p.metadata.name for p in core.list_namespaced_pod("default").items)
                 == ["cli-router-0", "cli-router-1", "cli-w-0"], timeout=30,
                 what="the operator process to create the worker and routers")
        assert httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=10).status_code == 200
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'kvflock_operator_actions_total{kind="Pod",verb="create"}' in scraped
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
