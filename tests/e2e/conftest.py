"""The local cluster as the e2e tests see it: one `kvflock up` (a real process tree on
127.0.0.1) per test module, driven with the real kubectl and the openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvflock.local.process import free_port
from tests.polling import wait_for  # noqa: F401  (re-exported to the tests here)

REPO = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).parent / "kubectl"


@dataclass
class Cluster:
    """A running `kvflock up` and the ways to reach it."""

    process: subprocess.Popen[bytes]
    state_dir: Path
    kubeconfig: Path
    router_port: int

    def kubectl(self, *args: str, check: bool = True) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        cache = ["--cache-dir", str(self.state_dir / "kube-cache")]  # not ~/.kube: each run has its own port
        done = subprocess.run([str(KUBECTL), *cache, *args], env=env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout + (done.stderr if not check else "")

    def get(self, kind: str, name: str | None = None, *selectors: str) -> Any:
        """`kubectl get -o json` as data (None when a named object does not exist)."""
        out = self.kubectl("get", kind, *([name] if name else []), *selectors, "-o", "json", check=False)
        try:
            return json.loads(out)
        except ValueError:
            return None

    def workers(self, service: str) -> list[dict[str, Any]]:
        pods = self.get("pods", None, "-l", f"kvflock.dev/service={service},kvflock.dev/role=worker")
        return pods["items"] if pods else []


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A module's cluster; `kvflock up` gets the module's ``UP_ARGS`` (e.g. ``("--operators", "2")``)."""
    if not KUBECTL.exists():
        pytest.skip(f"needs the real kubectl at {KUBECTL} (make venv installs it)")
    state_dir = tmp_path_factory.mktemp("kvflock")
    api_port, router_port = free_port(), free_port()
    log = open(state_dir / "up.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "kvflock.cli", "up", "--state-dir", str(state_dir),
         "--api-port", str(api_port), "--router-port", str(router_port), *getattr(request.module, "UP_ARGS", ())],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: (state_dir / "cluster.json").exists() or process.poll() is not None, 180, "kvflock up")
        assert process.poll() is None, (state_dir / "up.log").read_text()[-3000:]
        yield Cluster(process, state_dir, state_dir / "kubeconfig", router_port)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        log.close()
        leftovers = list((state_dir / "pids").glob("*"))
        subprocess.run([sys.executable, "-m", "kvflock.cli", "down", "--state-dir", str(state_dir)],
                       capture_output=True, timeout=120)
        assert code == 0, f"kvflock up exited with {code} after Ctrl-C"
        assert not leftovers, f"processes left running after Ctrl-C: {[p.name for p in leftovers]}"


def demo_manifest(cluster: Cluster, name: str, **spec: Any) -> str:
    """The path of examples/smollm2-demo.yaml rewritten as the service `name` with `spec`'s fields,
    each worker on one compute thread: replicas share the machine's cores, and torch's default of
    a thread per core makes every worker wait for descheduled threads at each operation."""
    service = yaml.safe_load((REPO / "examples" / "smollm2-demo.yaml").read_text())
    service["metadata"]["name"] = name
    service["spec"].update(spec, env=[{"name": "OMP_NUM_THREADS", "value": "1"}])
    path = cluster.state_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(service))
    return str(path)


def service_status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (cluster.get("infsvc", name) or {}).get("status") or {}


def pod_ready(pod: dict[str, Any] | None) -> bool:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def first_container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["status"]["containerStatuses"][0]
