"""The local cluster's process kubelet: runs each Pod's container as a local process.

It does for the local cluster what the kubelet does on a node, minus images and isolation:
it watches Pods, starts each one's container command with its args and env as a process of
its own, gives the container's ports free ports on 127.0.0.1 (rewriting ``--port`` and
``--host`` in the command), writes the address into the ``kvflock.dev/endpoint`` annotation
(pods here share one IP, so the port is what tells them apart), and reports back into the
Pod's status what the kubelet reports: phase, podIP, readiness from the readiness probe,
startup and liveness probes, restart counts, each exit's code and reason, CrashLoopBackOff.
Containers restart per ``restartPolicy`` with the kubelet's back-off (immediately, then 10 s
doubling to 5 min). A Pod's ``initContainers`` run first, in order, each to completion: a failed
one is restarted with the same back-off (with ``restartPolicy: Never`` the Pod fails), and the
Pod stays Pending, its ``initContainerStatuses`` showing each, until the last has completed.
A deleted Pod's process gets SIGTERM, then SIGKILL after the Pod's grace period. Each Pod's
output goes to ``<state dir>/logs/<namespace>_<pod>_<container>.log``.

The worker pods (label ``kvflock.dev/role=worker``) share the machine's cores: when a worker's
container starts, it gets ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (which torch's thread pool
follows) = max(1, cores // workers), where cores are those this process may run on
(``os.sched_getaffinity``) less one, which the local control plane (API server, operator, routers,
load balancer) keeps, and workers the worker pods this kubelet runs then, itself included;
a container's cpu limit, when set, caps it. Other pods (the router) wait on the network, not
on arithmetic: one thread, or their cpu limit. A worker that started alone keeps its threads
when a second one joins (a running process cannot be told), and takes its share when it
restarts. Without the division, two workers on a 2-core machine ran two threads each and
answered about ten times slower than one worker alone; and one worker on both cores of a 2-core
machine answered in 4-7 s where it took 0.6 s on one (the control plane's processes preempted
its threads).

Only what the workers need is emulated: one container per Pod (and its init containers), HTTP
probes, env values and ``fieldRef`` env, and `secret`, `configMap`, `emptyDir` and `hostPath`
volumes, which `kvflock.local.volumes` writes into the pod's folder (or finds on this machine) and
points each container's command and env mount paths at (a process cannot mount); PVCs are not
mounted (the process sees the host's files). A ``securityContext`` is ignored: the processes run
as the user who runs the local cluster.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from kvflock.local import volumes
from kvflock.local.follow import follow
from kvflock.local.process import ManagedProcess, free_port, resolve_command
from kvflock.shared.names import ANNOTATION_ENDPOINT, LABEL_ROLE, ROLE_WORKER

__all__ = ["ProcessKubelet", "worker_cores", "rewrite_listen_args"]

log = logging.getLogger(__name__)

POD_IP = "127.0.0.1"
_MERGE_PATCH = "application/merge-patch+json"
_BACKOFF_INITIAL = 10.0
_BACKOFF_MAX = 300.0
_HEALTHY_RUN = 600.0  # a container that ran this long restarts without back-off again
_TICK = 0.2  # seconds between checks of a running process
_MOUNT_RETRY = 2.0  # seconds between tries to mount a volume whose Secret or ConfigMap is missing


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else all of the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity on this platform
        return os.cpu_count() or 1


def worker_cores() -> int:
    """The cores the worker pods share: all but one, which the control plane keeps."""
    return max(1, available_cores() - 1)


def _cores(quantity: str | int | float) -> float:
    """A Kubernetes cpu quantity in cores: ``500m`` is 0.5."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _backoff(failures_in_a_row: int) -> float:
    """Seconds before the next restart: none after a first failure, then 10 s doubling to 5 min."""
    if failures_in_a_row <= 1:
        return 0.0
    return min(_BACKOFF_MAX, _BACKOFF_INITIAL * 2 ** (failures_in_a_row - 2))


def rewrite_listen_args(argv: Sequence[str], ports: Mapping[int, int], host: str = POD_IP) -> list[str]:
    """A container command with its listening address made local: ``--port N`` becomes the
    local port given for container port N, ``--host X`` becomes `host` (both appended when
    absent and the container declares a port)."""
    result: list[str] = []
    seen_port = seen_host = False
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        key, eq, inline = item.partition("=")
        if key in ("--port", "--host"):
            value = inline if eq else (items[i + 1] if i + 1 < len(items) else "")
            i += 1 if eq else 2
            if key == "--port":
                seen_port = True
                value = str(ports.get(int(value), value)) if value.isdigit() else value
            else:
                seen_host = True
                value = host
            result += [key, value]
            continue
        result.append(item)
        i += 1
    if ports and not seen_port:
        result += ["--port", str(next(iter(ports.values())))]
    if ports and not seen_host:
        result += ["--host", host]
    return result


@dataclass
class _Probe:
    """One of a container's HTTP probes and its running tally."""

    kind: str  # startup, readiness or liveness
    url: str
    period: float
    timeout: float
    failure_threshold: int
    success_threshold: int
    due: float
    failures: int = 0
    successes: int = 0
    last_message: str = ""

    @classmethod
    def parse(cls, kind: str, spec: Mapping[str, Any] | None, ports: Mapping[str | int, int],
              started: float) -> _Probe | None:
        if not spec or "httpGet" not in spec:
            return None
        get = spec["httpGet"]
        port = ports.get(get.get("port"), get.get("port"))
        path = get.get("path", "/")
        return cls(
            kind=kind,
            url=f"http://{POD_IP}:{port}{path if path.startswith('/') else '/' + path}",
            period=float(spec.get("periodSeconds", 10)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
            success_threshold=int(spec.get("successThreshold", 1)),
            due=started + float(spec.get("initialDelaySeconds", 0)),
        )

    def check(self) -> tuple[bool, str]:
        """One HTTP GET: success on 2xx and 3xx, as the kubelet's httpGet probe."""
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as response:
                return 200 <= response.status < 400, f"HTTP probe answered {response.status}"
        except urllib.error.HTTPError as exc:
            return False, f"HTTP probe failed with statuscode: {exc.code}"
        except (OSError, ValueError) as exc:
            return False, f"Get {self.url!r}: {exc}"

    def run(self, now: float) -> bool | None:
        """Probe if due; True/False when the probe's verdict changes, else None."""
        if now < self.due:
            return None
        self.due = now + self.period
        ok, self.last_message = self.check()
        if ok:
            self.failures, self.successes = 0, self.successes + 1
            return True if self.successes == self.success_threshold else None
        self.successes, self.failures = 0, self.failures + 1
        return False if self.failures == self.failure_threshold else None


@dataclass
class _ContainerState:
    """What the Pod's containerStatuses report about the one container."""

    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    phase: str = "Pending"
    ready_since: str = field(default_factory=_now)


class _PodRunner:
    """The life of one Pod on this node: its container's runs, probes and restarts."""

    def __init__(self, kubelet: ProcessKubelet, pod: Mapping[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        self.kubelet = kubelet
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.spec = spec
        self.container = spec["containers"][0]
        self.is_worker = (meta.get("labels") or {}).get(LABEL_ROLE) == ROLE_WORKER
        self.grace = float(spec.get("terminationGracePeriodSeconds", 30))
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.ports: dict[str | int, int] = {}
        for port in self.container.get("ports") or []:
            local = free_port()
            self.ports[port["containerPort"]] = local
            if port.get("name"):
                self.ports[port["name"]] = local
        self.status = _ContainerState()
        self.init_containers: list[dict[str, Any]] = list(spec.get("initContainers") or [])
        self.init_statuses = [_ContainerState(state={"waiting": {"reason": "PodInitializing"}})
                              for _ in self.init_containers]
        self.initialized = not self.init_containers
        if not self.initialized:
            self.status.state = {"waiting": {"reason": "PodInitializing"}}
        self.folders: dict[str, Path] = {}  # volume name -> the folder that stands in for it
        self.stopping = threading.Event()
        self.process: ManagedProcess | None = None
        self._reported: dict[str, Any] | None = None
        self._started_at = _now()
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.namespace}/{self.name}", daemon=True)

    @property
    def endpoint(self) -> str | None:
        numbered = [p for p in self.ports if isinstance(p, int)]
        return f"http://{POD_IP}:{self.ports[numbered[0]]}" if numbered else None

    def _argv(self, container: Mapping[str, Any]) -> list[str]:
        mounts = volumes.mount_points(container.get("volumeMounts") or [], self.folders)
        argv = [volumes.rewrite(arg, mounts)
                for arg in [*(container.get("command") or []), *(container.get("args") or [])]]
        if container is not self.container:  # an init container listens nowhere
            return argv
        numbered = {k: v for k, v in self.ports.items() if isinstance(k, int)}
        return rewrite_listen_args(argv, numbered)

    @property
    def workdir(self) -> Path:
        return self.kubelet.state_dir / "pods" / f"{self.namespace}_{self.name}"

    def _mount(self) -> bool:
        """Write the pod's volumes; until that works (a missing Secret), report FailedMount and
        retry, as a node's kubelet does. False when the pod was stopped meanwhile."""
        reported = ""
        while not self.stopping.is_set():
            try:
                self.folders = volumes.materialize(self.spec.get("volumes") or [], self.workdir / "volumes",
                                                   self.kubelet.read_data(self.namespace))
                return True
            except volumes.MountError as exc:
                message = f"MountVolume.SetUp failed for {exc}"
                if message != reported:
                    self.status.state = {"waiting": {"reason": "ContainerCreating", "message": message}}
                    self._report()
                    self.kubelet.event(self, "Warning", "FailedMount", message)
                    reported = message
            self.stopping.wait(_MOUNT_RETRY)
        return False

    def _env(self, container: Mapping[str, Any]) -> dict[str, str]:
        fields = {"metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                  "status.podIP": POD_IP, "status.hostIP": POD_IP, "spec.nodeName": self.kubelet.node_name}
        threads = str(self._cpu_threads())
        env = {**os.environ, **self.kubelet.extra_env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        mounts = volumes.mount_points(container.get("volumeMounts") or [], self.folders)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = volumes.rewrite(str(var["value"]), mounts)
            elif "fieldRef" in (var.get("valueFrom") or {}):
                value = fields.get(var["valueFrom"]["fieldRef"].get("fieldPath", ""))
                if value is not None:
                    env[var["name"]] = value
        return env

    def _cpu_threads(self) -> int:
        """Threads for the container's math libraries, by the rule in the module's docstring."""
        cores = available_cores()
        share = max(1, worker_cores() // self.kubelet.running_workers()) if self.is_worker else 1
        limit = ((self.container.get("resources") or {}).get("limits") or {}).get("cpu")
        if limit is None:
            return share
        allowed = max(1, int(_cores(limit)))
        return min(share, allowed) if self.is_worker else min(cores, allowed)

    # ---- reporting ---------------------------------------------------------------------

    def _container_status(self, container: Mapping[str, Any], s: _ContainerState, running: bool) -> dict[str, Any]:
        """One entry of containerStatuses or initContainerStatuses; `running`: its process is self.process."""
        process = self.process if running else None
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"process://{process.pid}" if process and process.pid else "",
            "ready": s.ready,
            "started": s.started,
            "restartCount": s.restart_count,
            "state": s.state,
            "lastState": s.last_state,
        }

    def _report(self) -> None:
        s = self.status
        condition_time = s.ready_since
        ready = "True" if s.ready else "False"
        container_status = self._container_status(self.container, s, self.initialized)
        initialized: dict[str, Any] = {"type": "Initialized", "status": "True", "lastTransitionTime": self._started_at}
        if not self.initialized:
            pending = [c["name"] for c, cs in zip(self.init_containers, self.init_statuses) if not cs.ready]
            initialized = {**initialized, "status": "False", "reason": "ContainersNotInitialized",
                           "message": f"containers with incomplete status: [{' '.join(pending)}]"}
        status = {
            "phase": s.phase,
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "hostIP": POD_IP,
            "startTime": self._started_at,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": self._started_at},
                initialized,
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": condition_time},
                {"type": "Ready", "status": ready, "lastTransitionTime": condition_time},
            ],
            "containerStatuses": [container_status],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [
                self._container_status(c, cs, not self.initialized and cs.state.get("running") is not None)
                for c, cs in zip(self.init_containers, self.init_statuses)]
        if status == self._reported:
            return
        if self.kubelet.patch_status(self.namespace, self.name, status):
            self._reported = status

    def _set_ready(self, ready: bool) -> None:
        if ready != self.status.ready:
            self.status.ready = ready
            self.status.ready_since = _now()

    # ---- the container's life ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self.kubelet.bind(self.namespace, self.name, self.endpoint)
            self._report()
            failures_in_a_row = 0
            while self._mount():
                if not self.initialized and not self._initialize():
                    return
                started = time.monotonic()
                code, reason, message = self._run_once()
                if self.stopping.is_set():
                    break
                ran = time.monotonic() - started
                failures_in_a_row = 0 if ran >= _HEALTHY_RUN else failures_in_a_row + 1
                terminated = {"exitCode": code, "reason": reason, "startedAt": self.status.state.get(
                    "running", {}).get("startedAt", _now()), "finishedAt": _now()}
                if message:
                    terminated["message"] = message
                self._set_ready(False)
                self.status.started = False
                if not self._restarts(code):
                    self.status.state = {"terminated": terminated}
                    self.status.phase = "Succeeded" if code == 0 else "Failed"
                    self._report()
                    return
                self.status.last_state = {"terminated": terminated}
                delay = _backoff(failures_in_a_row)
                if delay:
                    why = f" after {reason} (exit code {code})" + (f": {message}" if message else "")
                    text = (f"back-off {delay:.0f}s restarting failed container={self.container['name']} "
                            f"pod={self.name}_{self.namespace}{why}")
                    self.status.state = {"waiting": {"reason": "CrashLoopBackOff", "message": text}}
                    self._report()
                    self.kubelet.event(self, "Warning", "BackOff", f"Back-off restarting failed container{why}")
                    if self.stopping.wait(delay):
                        break
                self.status.restart_count += 1
        except Exception:  # a runner must never take the kubelet down; the Pod shows it stopped
            log.exception("pod %s/%s: the runner failed", self.namespace, self.name)

    def _initialize(self) -> bool:
        """Run the init containers in order, each to completion, restarting a failed one with
        back-off (with restartPolicy Never a failure fails the Pod); True once all completed,
        False when the Pod failed or was stopped."""
        for container, status in zip(self.init_containers, self.init_statuses):
            name = container["name"]
            failures_in_a_row = 0
            while not status.ready:
                code, reason, message = self._run_to_completion(container, status)
                if self.stopping.is_set():
                    return False
                terminated = {"exitCode": code, "reason": reason, "finishedAt": _now(),
                              "startedAt": status.state.get("running", {}).get("startedAt", _now()),
                              **({"message": message} if message else {})}
                if code == 0:
                    status.state, status.ready = {"terminated": terminated}, True
                    self._report()
                    break
                if self.restart_policy == "Never":
                    status.state = {"terminated": terminated}
                    self.status.phase = "Failed"
                    self._report()
                    return False
                failures_in_a_row += 1
                status.last_state = {"terminated": terminated}
                delay = _backoff(failures_in_a_row)
                if delay:
                    why = f" after {reason} (exit code {code})" + (f": {message}" if message else "")
                    status.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                        f"back-off {delay:.0f}s restarting failed container={name} pod={self.name}_{self.namespace}{why}")}}
                    self._report()
                    self.kubelet.event(self, "Warning", "BackOff", f"Back-off restarting failed container{why}", name)
                    if self.stopping.wait(delay):
                        return False
                status.restart_count += 1
        self.initialized = True
        return True

    def _start(self, container: Mapping[str, Any], init: bool) -> str | None:
        """Start a container's process as self.process; what went wrong if it could not start."""
        argv = self._argv(container)
        name = container["name"]
        executable = resolve_command(argv[0]) if argv else None
        if executable is None:
            message = f"exec: {argv[0] if argv else '(no command)'!r}: executable file not found in $PATH"
            self.kubelet.event(self, "Warning", "Failed", f"Error: {message}", name if init else None)
            return message
        logs = self.kubelet.state_dir / "logs" / f"{self.namespace}_{self.name}_{name}.log"
        self.process = ManagedProcess([executable, *argv[1:]], self._env(container), logs, self.workdir,
                                      self.kubelet.pid_dir)
        self.process.start()
        return None

    def _run_to_completion(self, container: Mapping[str, Any], status: _ContainerState) -> tuple[int, str, str]:
        """Run an init container until it exits or the Pod stops; (exit code, reason, message)."""
        name = container["name"]
        if (problem := self._start(container, init=True)) is not None:
            return 128, "StartError", problem
        assert self.process is not None
        status.state = {"running": {"startedAt": _now()}}
        self._report()
        self.kubelet.event(self, "Normal", "Started", f"Started container {name} (pid {self.process.pid})", name)
        while (code := self.process.poll()) is None:
            if self.stopping.wait(_TICK):
                self.process.stop(self.grace)
                return 0, "Killed", ""
        return code, "Completed" if code == 0 else "Error", self.process.last_error() if code != 0 else ""

    def _restarts(self, code: int) -> bool:
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)

    def _run_once(self) -> tuple[int, str, str]:
        """Start the container, probe it until it ends; (exit code, reason, message)."""
        name = self.container["name"]
        if (problem := self._start(self.container, init=False)) is not None:
            return 128, "StartError", problem
        assert self.process is not None
        started = time.monotonic()
        self.status.state = {"running": {"startedAt": _now()}}
        self.status.phase = "Running"
        ports = self.ports
        startup = _Probe.parse("startup", self.container.get("startupProbe"), ports, started)
        readiness = _Probe.parse("readiness", self.container.get("readinessProbe"), ports, started)
        liveness = _Probe.parse("liveness", self.container.get("livenessProbe"), ports, started)
        self.status.started = startup is None
        self._set_ready(readiness is None)
        self._report()
        self.kubelet.event(self, "Normal", "Started", f"Started container {name} (pid {self.process.pid})")
        while True:
            code = self.process.poll()
            if code is not None:
                message = self.process.last_error() if code != 0 else ""
                return code, "Completed" if code == 0 else "Error", message
            if self.stopping.wait(_TICK):
                self.status.state = {"terminated": {"exitCode": 0, "reason": "Killed"}}
                self.process.stop(self.grace)
                return 0, "Killed", ""
            now = time.monotonic()
            if not self.status.started:
                assert startup is not None
                verdict = startup.run(now)
                if verdict is True:
                    self.status.started = True
                    for probe in (readiness, liveness):  # they start once the startup probe passed
                        if probe is not None:
                            probe.due = now
                elif verdict is False:
                    return self._kill_unhealthy(startup)
                self._report()
                continue
            if liveness is not None and liveness.run(now) is False:
                return self._kill_unhealthy(liveness)
            if readiness is not None:
                verdict = readiness.run(now)
                if verdict is not None:
                    self._set_ready(verdict)
            self._report()

    def _kill_unhealthy(self, probe: _Probe) -> tuple[int, str, str]:
        assert self.process is not None
        name = self.container["name"]
        self.kubelet.event(self, "Warning", "Unhealthy",
                           f"{probe.kind.capitalize()} probe failed: {probe.last_message}")
        self.kubelet.event(self, "Normal", "Killing",
                           f"Container {name} failed {probe.kind} probe, will be restarted")
        code = self.process.stop(self.grace)
        return code if code is not None else 137, "Error", f"{probe.kind} probe failed: {probe.last_message}"

    def stop(self) -> None:
        """The Pod is gone (or the node shuts down): end the container, gracefully first."""
        self.stopping.set()
        if self.process is not None:
            self.process.stop(self.grace)


class ProcessKubelet:
    """Watches all Pods and runs each one as a `_PodRunner` until it is deleted."""

    def __init__(self, api_client: kubernetes.client.ApiClient, state_dir: Path, *,
                 node_name: str = "local", extra_env: Mapping[str, str] | None = None,
                 pid_dir: Path | None = None) -> None:
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.state_dir = state_dir
        self.node_name = node_name
        self.extra_env = dict(extra_env or {})
        self.pid_dir = pid_dir
        self._runners: dict[str, _PodRunner] = {}
        # Deleted pods whose processes are still ending (within their grace period): `stop` and
        # `processes` must still see them, or a shutdown right after a deletion leaves them running.
        self._retiring: dict[str, _PodRunner] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="kubelet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def processes(self) -> dict[str, int]:
        """namespace/name -> pid of every container process running now."""
        with self._lock:
            runners = [*self._runners.values(), *self._retiring.values()]
        return {f"{r.namespace}/{r.name}": r.process.pid for r in runners
                if r.process is not None and r.process.pid and r.process.poll() is None}

    def running_workers(self) -> int:
        """Worker pods this kubelet runs now (at least 1: the one asking is one)."""
        with self._lock:
            return max(1, sum(1 for r in self._runners.values() if r.is_worker and not r.stopping.is_set()))

    def stop(self) -> None:
        """Stop watching and end every Pod's process, those of deleted pods still ending included
        (in parallel, each with its grace period); returns once every runner has finished."""
        self._stop.set()
        with self._lock:
            runners = [*self._runners.values(), *self._retiring.values()]
            self._runners.clear()
        stoppers = [threading.Thread(target=r.stop) for r in runners]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for runner in runners:  # a runner between two runs of its container could start another one
            if runner.thread.is_alive():
                runner.thread.join(timeout=runner.grace + 15)
        self._thread.join(timeout=10)

    # ---- the API server's side -----------------------------------------------------------

    def _watch(self) -> None:
        follow(self.core.list_pod_for_all_namespaces, lambda pods: self._sync(pods, full=True), self._pod_event,
               self._stop, "kubelet")

    def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._forget(pod["metadata"]["uid"])
        else:
            self._sync([pod], full=False)

    def _sync(self, pods: Sequence[Mapping[str, Any]], full: bool) -> None:
        """Start runners for new pods; with `full`, stop those whose pod is gone."""
        uids = set()
        for pod in pods:
            meta = pod["metadata"]
            uid = meta["uid"]
            uids.add(uid)
            if meta.get("deletionTimestamp"):
                continue
            with self._lock:
                if uid in self._runners or self._stop.is_set():
                    continue
            if len(pod["spec"]["containers"]) != 1:
                self.patch_status(meta["namespace"], meta["name"], {
                    "phase": "Failed", "reason": "Unsupported",
                    "message": "the local kubelet runs pods of exactly one container"})
                continue
            runner = _PodRunner(self, pod)
            with self._lock:
                self._runners[uid] = runner
            log.info("kubelet: starting pod %s/%s", runner.namespace, runner.name)
            runner.thread.start()
        if full:
            with self._lock:
                gone = [uid for uid in self._runners if uid not in uids]
            for uid in gone:
                self._forget(uid)

    def _forget(self, uid: str) -> None:
        with self._lock:
            runner = self._runners.pop(uid, None)
            if runner is not None:
                self._retiring[uid] = runner
        if runner is not None:
            log.info("kubelet: stopping pod %s/%s", runner.namespace, runner.name)
            self.event(runner, "Normal", "Killing", f"Stopping container {runner.container['name']}")
            threading.Thread(target=self._retire, args=(uid, runner), name=f"stop-{runner.name}", daemon=True).start()

    def _retire(self, uid: str, runner: _PodRunner) -> None:
        runner.stop()
        if runner.thread.is_alive():
            runner.thread.join(timeout=runner.grace + 15)
        with self._lock:
            self._retiring.pop(uid, None)

    def read_data(self, namespace: str) -> volumes.ReadData:
        """How a pod of `namespace` reads a Secret's or ConfigMap's data for its volumes."""

        def read(kind: str, name: str) -> dict[str, bytes] | None:
            call = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
            try:
                obj = self.core.api_client.sanitize_for_serialization(call(name, namespace))
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise volumes.MountError(f"{kind} {name!r}: {exc.reason}") from exc
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()} if kind == "Secret" \
                else {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            return data

        return read

    def bind(self, namespace: str, name: str, endpoint: str | None) -> None:
        """Put the pod on this node and publish its address."""
        patch: dict[str, Any] = {"spec": {"nodeName": self.node_name}}
        if endpoint:
            patch["metadata"] = {"annotations": {ANNOTATION_ENDPOINT: endpoint}}
        self._patch(self.core.patch_namespaced_pod, namespace, name, patch)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        return self._patch(self.core.patch_namespaced_pod_status, namespace, name, {"status": dict(status)})

    def _patch(self, call: Any, namespace: str, name: str, body: Mapping[str, Any]) -> bool:
        try:
            call(name, namespace, body, _content_type=_MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:  # a deleted pod: its runner is being stopped
                log.warning("kubelet: patching pod %s/%s failed: %s", namespace, name, exc.reason)
            return False
        except Exception as exc:  # the API server is going away at shutdown
            log.debug("kubelet: patching pod %s/%s failed: %s", namespace, name, exc)
            return False
        return True

    def event(self, runner: _PodRunner, type_: str, reason: str, message: str, container: str | None = None) -> None:
        """Post an Event about a pod's container (default: its one container), as the kubelet does
        (kubectl describe pod shows them)."""
        now = _now()
        body = {
            "metadata": {"generateName": f"{runner.name}.", "namespace": runner.namespace},
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": runner.namespace,
                               "name": runner.name, "uid": runner.uid,
                               "fieldPath": (f"spec.initContainers{{{container}}}" if container
                                             else f"spec.containers{{{runner.container['name']}}}")},
            "reason": reason, "message": re.sub(r"\s+", " ", message)[:1024], "type": type_,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet", "reportingInstance": self.node_name,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.core.create_namespaced_event(runner.namespace, body)
        except Exception as exc:  # Events are best effort, as in Kubernetes
            log.debug("kubelet: posting an event failed: %s", exc)
