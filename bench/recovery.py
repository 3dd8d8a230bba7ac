"""Kill -> Ready of a SmolLM2 worker in the local cluster, phase by phase, with the startup probe
the operator renders now (on /ready) beside the one it rendered before (on /health), measured in
the same run, alternating.

A worker pod as the operator renders it for examples/smollm2-demo.yaml (its engine ConfigMap
too) runs under the local cluster's kubelet; each round SIGKILLs its process and times, from
the kill: the kubelet starting the new process (restart back-off), the server listening
(process start and imports: uvicorn's "Started server process" line), the weights loaded and
the engine built (the worker's "engine ready" line), the warm-up done, and the pod Ready (the
probes). The worker's phase lines carry millisecond timestamps; the rest is polled every 50 ms.

Traffic goes through a router (kvflock.router, in this process, round-robin over both pods):
before each kill a greedy stream is started on the pod about to die, and the round also times
"traffic re-routed" (the stream's first chunk after the kill: the router has continued it on the
other pod) and "capacity restored" (the router's first answer from the restarted pod). Every
stream must end whole ([DONE]); a cut one is reported.

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
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes.client
import uvicorn
import yaml

from kvflock.local.localcluster import LocalCluster
from kvflock.local.process import free_port
from kvflock.operator import children
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.router.app import RouterOptions, StaticDiscovery, create_app
from kvflock.router.fleet import Endpoint
from kvflock.shared.names import ANNOTATION_ENDPOINT

REPO = Path(__file__).resolve().parents[1]
NS = "default"
PHASES = ("traffic re-routed", "restarted", "listening", "engine ready", "warm-up done", "pod Ready",
          "capacity restored")
MODEL = "smollm2-135m-instruct"
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


class _Stream:
    """A greedy stream through the router, read in a thread: when each chunk arrived, and
    whether it ended whole."""

    def __init__(self, router: str, replica: str) -> None:
        self.arrivals: list[float] = []
        self.whole = False
        self.landed = threading.Event()
        self.replica = replica
        self._router = router
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        body = {"model": MODEL, "prompt": "A long story about a lighthouse keeper:", "max_tokens": 128,
                "temperature": 0, "ignore_eos": True, "stream": True}
        while True:  # round-robin: the next try lands on the other pod
            with httpx.stream("POST", f"{self._router}/v1/completions", json=body, timeout=600) as response:
                if response.headers.get("x-kvflock-replica") != self.replica:
                    continue
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue  # the blank line that ends each event
                    self.arrivals.append(time.monotonic())
                    if len(self.arrivals) == 3:
                        self.landed.set()
                    self.whole = line == "data: [DONE]"
                return

    def rerouted_after(self, killed: float) -> float:
        """Seconds from the kill to the first chunk after it; waits for the stream's end."""
        self._thread.join(timeout=600)
        return next(at for at in self.arrivals if at > killed) - killed


def _answered_by(router: str, replica: str) -> bool:
    try:
        response = httpx.post(f"{router}/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    except httpx.TransportError:
        return False
    return response.status_code == 200 and response.headers.get("x-kvflock-replica") == replica


def _round(core: kubernetes.client.CoreV1Api, name: str, log: Path, router: str) -> dict[str, float]:
    """SIGKILL the pod's process, a stream in flight on it; seconds from the kill to each phase."""
    stream = _Stream(router, name)
    if not stream.landed.wait(600):
        raise TimeoutError(f"no stream landed on {name} within 600 s")
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
    while not _answered_by(router, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the router got no answer from {name} within 600 s of the kill")
        time.sleep(0.05)
    times["capacity restored"] = time.monotonic() - killed
    times["traffic re-routed"] = stream.rerouted_after(killed)
    if not stream.whole:
        print(f"the stream on {name} was cut")
    time.sleep(1.5)  # the phase lines are flushed by now
    times.update({phase: at - killed_wall for phase, at in _log_times(log, killed_wall).items()})
    return times


def _serve_router(endpoints: list[Endpoint]) -> tuple[str, uvicorn.Server]:
    """A router over the pods, round-robin, in a thread of this process."""
    app = create_app(StaticDiscovery(endpoints), options=RouterOptions(policy="round-robin", poll_interval=0.2))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.1)
    while httpx.get(f"{url}/ready").status_code != 200:
        time.sleep(0.1)
    return url, server


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
            pods = [core.read_namespaced_pod(n, NS) for n in names.values()]
            router, server = _serve_router([Endpoint(id=p.metadata.name, url=p.metadata.annotations[ANNOTATION_ENDPOINT])
                                            for p in pods])
            try:
                for _ in range(args.rounds):
                    for label, name in names.items():  # alternating, so that both see the same machine
                        results[label].append(_round(core, name, logs[label], router))
            finally:
                server.should_exit = True
        finally:
            cluster.stop()
    print(f"kill -> phase, seconds (median of {args.rounds}); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {datetime.date.today()}")
    print(f"{'phase':<18}" + "".join(f"{label:>38}" for label in results))
    for phase in PHASES:
        cells = [statistics.median(r[phase] for r in rounds) if all(phase in r for r in rounds) else float("nan")
                 for rounds in results.values()]
        print(f"{phase:<18}" + "".join(f"{cell:>38.2f}" for cell in cells))
    before, after = (statistics.median(r["pod Ready"] for r in rounds) for rounds in results.values())
    print(f"kill -> Ready, after/before: {after / before:.2f}")


if __name__ == "__main__":
    main()
