"""The local cluster's service load balancer: a fixed 127.0.0.1 address for each
InferenceService, with the service's router behind it.

In a cluster, clients reach an InferenceService through its entry Service (the operator's
``<name>`` Service, label ``kvfleet.dev/role=router``): cluster DNS and kube-proxy, or the
load balancer that a cloud (or k3s' ServiceLB, or MetalLB) provisions for it. The local
cluster has neither, so this controller does their job for the entry Services, as k3s'
ServiceLB does for LoadBalancer Services: it gives each one a port on 127.0.0.1 (the first
free one from ``first_port``, so the first service always gets the same URL), runs the
request router there (``kvfleet router``, which finds the service's workers through the API
server), restarts it if it exits, and publishes the address in the Service's
``kvfleet.dev/endpoint`` annotation, from which the operator writes ``status.url`` (the URL
column of ``kubectl get infsvc``). The router's output goes to
``<state dir>/logs/<namespace>_<service>_router.log``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import kubernetes.client
import kubernetes.watch
from kubernetes.client.exceptions import ApiException

from kvfleet.operator.children import ANNOTATION_ENDPOINT
from kvfleet.process import ManagedProcess

__all__ = ["LocalLoadBalancer"]

log = logging.getLogger(__name__)

ENTRY_SELECTOR = "kvfleet.dev/role=router"
LABEL_SERVICE = "kvfleet.dev/service"
_RESTART_BACKOFF_MAX = 30.0
_MERGE_PATCH = "application/merge-patch+json"


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class _Route:
    """One entry Service's address and the router process serving it."""

    uid: str  # the entry Service's
    namespace: str
    name: str  # the InferenceService's
    port: int
    process: ManagedProcess
    restarts: int = 0
    next_start: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LocalLoadBalancer:
    """Watches the entry Services and keeps a router listening for each."""

    def __init__(self, api_client: kubernetes.client.ApiClient, state_dir: Path, kubeconfig: Path,
                 first_port: int = 30080, pid_dir: Path | None = None) -> None:
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.state_dir = state_dir
        self.kubeconfig = kubeconfig
        self.first_port = first_port
        self.pid_dir = pid_dir
        self._routes: dict[str, _Route] = {}  # by Service uid
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch, name="loadbalancer-watch", daemon=True),
            threading.Thread(target=self._supervise, name="loadbalancer-routers", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def urls(self) -> dict[str, str]:
        """namespace/name -> URL of every InferenceService's router."""
        with self._lock:
            return {f"{r.namespace}/{r.name}": r.url for r in self._routes.values()}

    def processes(self) -> dict[str, int]:
        """namespace/name -> pid of every router running now."""
        with self._lock:
            routes = list(self._routes.values())
        return {f"{r.namespace}/{r.name}": r.process.pid for r in routes
                if r.process.pid and r.process.poll() is None}

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            routes = list(self._routes.values())
            self._routes.clear()
        for route in routes:
            route.process.stop(grace_seconds=5)
        for thread in self._threads:
            thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                listing = self.core.list_service_for_all_namespaces(label_selector=ENTRY_SELECTOR,
                                                                   _preload_content=False)
                services = json.loads(listing.data)["items"]
                present = {s["metadata"]["uid"] for s in services}
                for service in services:
                    self._add(service)
                with self._lock:
                    gone = [uid for uid in self._routes if uid not in present]
                for uid in gone:
                    self._remove(uid)
                watch = kubernetes.watch.Watch()
                for event in watch.stream(self.core.list_service_for_all_namespaces,
                                          label_selector=ENTRY_SELECTOR, timeout_seconds=5):
                    if self._stop.is_set():
                        watch.stop()
                        break
                    service = event["raw_object"]
                    if event["type"] == "DELETED":
                        self._remove(service["metadata"]["uid"])
                    else:
                        self._add(service)
            except Exception as exc:  # the API server restarting or going away: retry
                if not self._stop.is_set():
                    log.warning("load balancer: watching services failed (%s); retrying", exc)
                    self._stop.wait(1.0)

    def _free_port(self) -> int:
        with self._lock:
            taken = {r.port for r in self._routes.values()}
        port = self.first_port
        while port in taken or not _bindable(port):
            port += 1
        return port

    def _add(self, service: dict) -> None:
        meta = service["metadata"]
        uid = meta["uid"]
        with self._lock:
            if uid in self._routes or self._stop.is_set():
                return
        namespace = meta["namespace"]
        name = (meta.get("labels") or {}).get(LABEL_SERVICE, meta["name"])
        port = self._free_port()
        argv = [str(Path(sys.executable).parent / "kvfleet"), "router", "--host", "127.0.0.1", "--port", str(port),
                "--service", name, "--namespace", namespace, "--kubeconfig", str(self.kubeconfig)]
        process = ManagedProcess(argv, dict(os.environ), self.state_dir / "logs" / f"{namespace}_{name}_router.log",
                                 self.state_dir / "routers" / f"{namespace}_{name}", self.pid_dir)
        route = _Route(uid, namespace, name, port, process)
        with self._lock:
            self._routes[uid] = route
        log.info("load balancer: %s/%s at %s", namespace, name, route.url)
        process.start()
        try:
            self.core.patch_namespaced_service(meta["name"], namespace,
                                               {"metadata": {"annotations": {ANNOTATION_ENDPOINT: route.url}}},
                                               _content_type=_MERGE_PATCH)
        except ApiException as exc:
            log.warning("load balancer: annotating service %s/%s failed: %s", namespace, meta["name"], exc.reason)

    def _remove(self, uid: str) -> None:
        with self._lock:
            route = self._routes.pop(uid, None)
        if route is not None:
            log.info("load balancer: %s/%s removed; stopping its router", route.namespace, route.name)
            route.process.stop(grace_seconds=5)

    def _supervise(self) -> None:
        """Restart routers that exited, with a back-off (1 s doubling to 30 s)."""
        while not self._stop.wait(0.5):
            with self._lock:
                routes = list(self._routes.values())
            now = time.monotonic()
            for route in routes:
                code = route.process.poll()
                if code is None:
                    continue
                if route.next_start == 0.0:
                    route.next_start = now + min(_RESTART_BACKOFF_MAX, 2.0 ** route.restarts)
                    log.warning("load balancer: the router of %s/%s exited with code %d; restarting",
                                route.namespace, route.name, code)
                elif now >= route.next_start:
                    with self._lock:
                        if self._routes.get(route.uid) is not route:
                            continue  # removed meanwhile
                        route.restarts += 1
                        route.next_start = 0.0
                        route.process.start()
