"""Kill -> Ready of a SmolLM2 worker in the local cluster, phase by phase, with the startup probe
the operator renders now (on /ready) beside the one it rendered before (on /health), measured in
the same run, alternating.

A worker pod as the operator renders it for examples/smollm2-demo.yaml (its engine ConfigMap
too) runs under the local cluster's kubelet; each round SIGKILLs its process and times, from
the kill: the kubelet starting the new process (restart back-off), the server listening
(process start and imports: uvicorn's "Started server process" line), the weights loaded and
the engine built (the worker's "engine ready" line), the warm-up done, and the pod Ready (the
probes). The worker's phase lines carry millisecond timestamps; the rest is polled every 50 ms.

    python -P bench/recovery.py --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import kubernetes.client
import yaml

from kvflock.local.localcluster import LocalCluster
from kvflock.local.process import free_port
from kvflock.operator import children
from kvflock.operator.crd import InferenceServiceSpec

REPO = Path(__file__).resolve().parents[1]
NS = "default"
PHASES = ("restarted", "listening", "engine ready", "warm-up done", "pod Ready")
_LINES = {"listening": "Started server process", "engine ready": "engine ready in", "warm-up done": "warm-up done in"}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _pod(name: str, startup_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The demo's worker pod (renamed) and its engine ConfigMap, the startup probe on `startup_path`."""
    doc = yaml.safe_load((REPO / "examples" / "smollm2-demo.yaml").read_text())
    owner = children.Owner(name, NS, f"bench-{name}")
    spec = InferenceServiceSpec.model_validate(doc["spec"])
    pod = children.worker_pod(owner, spec, 0, "bench")
    pod["metadata"].pop("ownerReferences", None)
    pod["spec"]["containers"][0]["startupProbe"]["httpGet"]["path"] = startup_path
    configmap = children.engine_configmap(owner, spec)
    configmap["metadata"].pop("ownerReferences", None)
    return pod, configmap


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status and pod.status.conditions) or [])


def _log_times(path: Path, since_wall: float) -> dict[str, float]:
    """Wall-clock times of the worker's phase lines written after `since_wall`."""
    found: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        match = _STAMP.match(line)
        if not match:
            continue
        at = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if at < since_wall:
            continue
        for phase, text in _LINES.items():
            if text in line and phase not in found:
                found[phase] = at
    return found


def _round(core: kubernetes.client.CoreV1Api, name: str, log: Path) -> dict[str, float]:
    """SIGKILL the pod's process; seconds from the kill to each phase."""
    pod = core.read_namespaced_pod(name, NS)
    status = pod.status.container_statuses[0]
    restarts, pid = status.restart_count, int(status.container_id.removeprefix("process://"))
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(pid, signal.SIGKILL)
    times: dict[str, float] = {}
    deadline = killed + 600
    while "pod Ready" not in times:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was not Ready within 600 s of the kill")
        pod = core.read_namespaced_pod(name, NS)
        status = pod.status.container_statuses[0]
        if "restarted" not in times and status.restart_count > restarts and status.state.running:
            times["restarted"] = time.monotonic() - killed
        if "restarted" in times and _ready(pod):
            times["pod Ready"] = time.monotonic() - killed
        time.sleep(0.05)
    time.sleep(1.5)  # the phase lines are flushed by now
    times.update({phase: at - killed_wall for phase, at in _log_times(log, killed_wall).items()})
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="kills per startup probe (default 3)")
    args = parser.parse_args()
    variants = {"before (startup probe on /health)": "/health", "after (startup probe on /ready)": "/ready"}
    results: dict[str, list[dict[str, float]]] = {label: [] for label in variants}
    with tempfile.TemporaryDirectory(prefix="kvflock-recovery-") as state:
        cluster = LocalCluster(Path(state), api_port=free_port(), router_port=free_port())
        cluster.start()
        try:
            assert cluster.kubelet is not None
            core = kubernetes.client.CoreV1Api(cluster.kubelet.core.api_client)
            names, logs = {}, {}
            for i, (label, path) in enumerate(variants.items()):
                pod, configmap = _pod(f"bench{i}", path)
                core.create_namespaced_config_map(NS, configmap)
                core.create_namespaced_pod(NS, pod)
                names[label] = name = pod["metadata"]["name"]
                logs[label] = Path(state) / "logs" / f"{NS}_{name}_{pod['spec']['containers'][0]['name']}.log"
            deadline = time.monotonic() + 600
            while not all(_ready(core.read_namespaced_pod(n, NS)) for n in names.values()):
                if time.monotonic() > deadline:
                    raise TimeoutError("the bench's workers were not Ready within 600 s")
                time.sleep(0.5)
            for _ in range(args.rounds):
                for label, name in names.items():  # alternating, so that both see the same machine
                    results[label].append(_round(core, name, logs[label]))
        finally:
            cluster.stop()
    print(f"kill -> phase, seconds (median of {args.rounds}); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {datetime.date.today()}")
    print(f"{'phase':<14}" + "".join(f"{label:>38}" for label in results))
    for phase in PHASES:
        cells = [statistics.median(r[phase] for r in rounds) if all(phase in r for r in rounds) else float("nan")
                 for rounds in results.values()]
        print(f"{phase:<14}" + "".join(f"{cell:>38.2f}" for cell in cells))
    before, after = (statistics.median(r["pod Ready"] for r in rounds) for rounds in results.values())
    print(f"kill -> Ready, after/before: {after / before:.2f}")


if __name__ == "__main__":
    main()
