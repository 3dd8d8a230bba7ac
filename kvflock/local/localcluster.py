"""The local cluster: the whole system in one process tree on one machine, no Kubernetes needed.

`LocalCluster` starts, each on its own thread:

- the API server (`kvflock.local.apiserver.ApiServer`, kmock's emulator with our CRD) on
  127.0.0.1, on its own event loop;
- the operator, the same code as in a cluster (`kvflock.operator.runner.run_operator`),
  on another event loop, talking to the API server over HTTP like any client; or, with
  ``operators`` > 1, that many operator Pods in the ``kvflock-system`` namespace, as the chart
  deploys them (`kvflock operator --peering`): processes the kubelet runs and restarts, which
  elect their leader through the ClusterKopfPeering ``kvflock`` (the others stand by and the
  next takes over within the peering lifetime once the leader dies);
- the process kubelet (`kvflock.local.kubelet`), which runs the worker and router Pods as
  processes (with this cluster's kubeconfig in ``KUBECONFIG``, where a cluster would mount a
  service-account token);
- the service load balancer (`kvflock.local.loadbalancer`), which gives each InferenceService a
  fixed local URL and forwards it to the router pod, as kube-proxy would;
- the operator's Prometheus /metrics on a free port of 127.0.0.1 (`operatorMetrics` in
  cluster.json), as the chart's metrics Service gives it in a cluster.

It writes a kubeconfig for the API server, so the real `kubectl` works against it, and
`cluster.json` (pid, URLs; the operator Pods' names and metrics URLs under ``operators``) for
`kvflock status` and `kvflock down`. Everything lives in
the state dir: the kubeconfig, the processes' logs (``logs/``), their pid files (``pids/``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import kubernetes.client
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server

from kvflock.local.apiserver import ApiServer
from kvflock.local.kubelet import ProcessKubelet
from kvflock.local.loadbalancer import LocalLoadBalancer
from kvflock.local.process import free_port

__all__ = ["DEFAULT_API_PORT", "DEFAULT_ROUTER_PORT", "OPERATOR_NAMESPACE", "LocalCluster", "StateDir",
           "default_state_dir"]

log = logging.getLogger(__name__)

DEFAULT_API_PORT = 16443
DEFAULT_ROUTER_PORT = 30080
CONTEXT = "kvflock-local"
OPERATOR_NAMESPACE = "kvflock-system"
PEERING = "kvflock"
# As the chart's default: a dead leader is replaced within 10 s, and a live one keeps at least
# 5 s of slack between its keep-alives (kopf sends them every lifetime - 5..10 s, at least 1 s).
PEERING_LIFETIME = 10


def default_state_dir() -> Path:
    """``$KVFLOCK_HOME``, else ``~/.kvflock``."""
    return Path(os.environ.get("KVFLOCK_HOME") or Path.home() / ".kvflock")


@dataclass(frozen=True)
class StateDir:
    """Where a local cluster keeps its files."""

    root: Path

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def info(self) -> Path:
        """cluster.json: the running cluster's pid and addresses; absent when none runs."""
        return self.root / "cluster.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    def read_info(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.info.read_text()))
        except (OSError, ValueError):
            return None


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> None:
    """A kubeconfig with one context for the local API server (no credentials: loopback only)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": server}}],
        "users": [{"name": CONTEXT, "user": {}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": CONTEXT, "namespace": namespace}}],
        "current-context": CONTEXT,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML, and kubectl reads it


class _ApiServerThread:
    """The API server on its own event loop, in a thread."""

    def __init__(self, port: int) -> None:
        from kvflock.operator.render import render_crd

        self.port = port
        self.api = ApiServer()
        self.api.install_crd(render_crd())
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="apiserver", daemon=True)

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.api, kmock.Server(self.api, port=self.port) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None or not self.url:
            raise RuntimeError(f"the API server could not listen on 127.0.0.1:{self.port}: {self._error}")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)


class _OperatorThread:
    """The operator (kopf) on its own event loop, in a thread, stopped through its stop flag."""

    def __init__(self, configuration: kubernetes.client.Configuration, probe_interval: float) -> None:
        self.configuration = configuration
        self.probe_interval = probe_interval
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)

    def _main(self) -> None:
        from kvflock.operator.runner import OperatorOptions, run_operator

        # The kubelet runs the workers on this machine: a model path missing here is missing for them.
        options = OperatorOptions(probe_interval=self.probe_interval, shares_worker_files=True)
        try:
            asyncio.run(run_operator(self.configuration, options=options, stop_flag=self._stop,
                                     ready_flag=self._ready))
        except Exception:
            log.exception("the operator stopped with an error")
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=60):
            raise RuntimeError("the operator did not start within 60 s")
        if not self._thread.is_alive():
            raise RuntimeError("the operator failed to start; see the log above")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def operator_pod(index: int, probe_interval: float, health_port: int, metrics_port: int) -> dict[str, Any]:
    """One operator replica as the chart's Deployment runs it, with its ports on this machine
    (the kubelet gives declared container ports free ports, but kopf's health and metrics
    listeners take theirs from flags)."""
    health = {"httpGet": {"path": "/healthz", "port": health_port}, "periodSeconds": 10, "timeoutSeconds": 5}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"kvflock-operator-{index}", "namespace": OPERATOR_NAMESPACE,
                     "labels": {"app.kubernetes.io/name": "kvflock-operator"}},
        "spec": {
            "restartPolicy": "Always",
            "containers": [{
                "name": "operator", "image": "kvflock",
                "command": ["kvflock", "operator", "--probe-interval", str(probe_interval),
                            "--health-port", str(health_port), "--metrics-port", str(metrics_port),
                            "--peering", PEERING, "--peering-lifetime", str(PEERING_LIFETIME),
                            "--shares-worker-files"],
                # kopf's identity in the peering object: the pod's name.
                "env": [{"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "livenessProbe": {**health, "failureThreshold": 3},
                "readinessProbe": health,
            }],
        },
    }


class LocalCluster:
    """API server, operator(s), kubelet and load balancer, started and stopped together."""

    def __init__(self, state_dir: Path, api_port: int = DEFAULT_API_PORT, router_port: int = DEFAULT_ROUTER_PORT,
                 probe_interval: float = 2.0, operators: int = 1) -> None:
        if operators < 1:
            raise ValueError(f"operators: must be at least 1, got {operators}")
        self.state = StateDir(state_dir)
        self.api_port = api_port
        self.router_port = router_port
        self.probe_interval = probe_interval
        self.operators = operators
        self.operator_pods: dict[str, str] = {}  # pod name -> its Prometheus /metrics URL
        self._apiserver: _ApiServerThread | None = None
        self._operator: _OperatorThread | None = None
        self.kubelet: ProcessKubelet | None = None
        self.loadbalancer: LocalLoadBalancer | None = None
        self._api_client: kubernetes.client.ApiClient | None = None
        self._metrics_server: Any = None
        self.operator_metrics_url = ""

    @property
    def api_url(self) -> str:
        assert self._apiserver is not None
        return self._apiserver.url

    def start(self) -> None:
        """Start everything, or nothing: a part that fails to start stops the others."""
        self.state.root.mkdir(parents=True, exist_ok=True)
        try:
            self._apiserver = _ApiServerThread(self.api_port)
            self._apiserver.start()
            write_kubeconfig(self.state.kubeconfig, self._apiserver.url)
            configuration = kubernetes.client.Configuration()
            configuration.host = self._apiserver.url
            self._api_client = kubernetes.client.ApiClient(configuration)
            if self.operators == 1:
                self._operator = _OperatorThread(configuration, self.probe_interval)
                self._operator.start()
                port = free_port()
                # The operator's counters live in this process's default registry.
                self._metrics_server, _ = start_http_server(port, "127.0.0.1")
                self.operator_metrics_url = f"http://127.0.0.1:{port}/metrics"
            # The pods' stand-in for a service-account token: the router pods (and the operator
            # pods) reach the API server with this kubeconfig.
            self.kubelet = ProcessKubelet(self._api_client, self.state.root, pid_dir=self.state.pids,
                                          extra_env={"KUBECONFIG": str(self.state.kubeconfig)})
            self.kubelet.start()
            if self.operators > 1:
                self._start_operator_pods()
            self.loadbalancer = LocalLoadBalancer(self._api_client, self.router_port)
            self.loadbalancer.start()
        except BaseException:
            self.stop()
            raise
        info: dict[str, Any] = {"pid": os.getpid(), "api": self._apiserver.url, "kubeconfig": str(self.state.kubeconfig),
                                "routerPorts": f"{self.router_port}+"}
        if self.operator_pods:
            info["operators"] = [{"pod": name, "metrics": url} for name, url in self.operator_pods.items()]
        else:
            info["operatorMetrics"] = self.operator_metrics_url
        self.state.info.write_text(json.dumps(info, indent=2) + "\n")

    def peers(self) -> dict[str, Any]:
        """The operator replicas' keep-alives in the peering object: pod name -> priority, lastseen, lifetime."""
        from kvflock.operator.runner import PEERING_GROUP, PEERING_VERSION

        assert self._api_client is not None
        custom = kubernetes.client.CustomObjectsApi(self._api_client)
        body = custom.get_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", PEERING)
        return dict(body.get("status") or {})

    def _start_operator_pods(self) -> None:
        """The peering CRDs and object, then the operator pods; returns once each has joined the peering."""
        from kvflock.operator.render import render_peering_crds
        from kvflock.operator.runner import PEERING_GROUP, PEERING_VERSION

        assert self._apiserver is not None and self._api_client is not None and self.kubelet is not None
        for crd in render_peering_crds():
            self._apiserver.api.install_crd(crd)
        custom = kubernetes.client.CustomObjectsApi(self._api_client)
        custom.create_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", {
            "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "ClusterKopfPeering",
            "metadata": {"name": PEERING}})
        core = kubernetes.client.CoreV1Api(self._api_client)
        try:
            core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        for index in range(self.operators):
            metrics_port = free_port()
            pod = operator_pod(index, self.probe_interval, free_port(), metrics_port)
            core.create_namespaced_pod(OPERATOR_NAMESPACE, pod)
            self.operator_pods[pod["metadata"]["name"]] = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 120  # a generous bound: each replica imports kopf and our handlers
        while not set(self.operator_pods) <= set(self.peers()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the operator pods did not join the peering {PEERING!r} within 120 s; "
                                   f"see {self.state.logs}/{OPERATOR_NAMESPACE}_kvflock-operator-*.log")
            time.sleep(0.2)

    def _stop_operator_pods(self) -> None:
        """Delete the operator pods and wait until their processes ended (each stops within its grace period)."""
        assert self._api_client is not None and self.kubelet is not None
        core = kubernetes.client.CoreV1Api(self._api_client)
        for name in self.operator_pods:
            try:
                core.delete_namespaced_pod(name, OPERATOR_NAMESPACE)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        deadline = time.monotonic() + 40
        while any(key.startswith(f"{OPERATOR_NAMESPACE}/") for key in self.kubelet.processes()):
            if time.monotonic() > deadline:
                break  # the kubelet's own stop below ends them
            time.sleep(0.2)

    def stop(self) -> None:
        """Operators first (so nothing is recreated), then the load balancer and the pods, the API server last."""
        if self._operator is not None:
            self._operator.stop()
        if self.operator_pods and self.kubelet is not None:
            try:
                self._stop_operator_pods()
            except Exception:  # the API server may be the part that failed; the kubelet still stops them
                log.exception("stopping the operator pods failed")
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        stoppers = [threading.Thread(target=part.stop) for part in (self.loadbalancer, self.kubelet) if part]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        if self._api_client is not None:
            self._api_client.close()
        if self._apiserver is not None:
            self._apiserver.stop()
        self.state.info.unlink(missing_ok=True)
