"""The local cluster's service load balancer: a fixed 127.0.0.1 address for each
InferenceService's entry Service, forwarded to the ready pods the Service selects.

In a cluster, clients reach an InferenceService through its entry Service (the operator's
``<name>`` Service, label ``kvflock.dev/role=router``, which selects the router pod): cluster
DNS and kube-proxy, or the load balancer a cloud (or k3s' ServiceLB, or MetalLB) provisions
for it. The local cluster has neither, so this controller does their job for the entry
Services, as k3s' ServiceLB does for LoadBalancer Services: it gives each one a port on
127.0.0.1 (the first free one from ``first_port``, so the first service always gets the same
URL), forwards each TCP connection made there to one of the Service's ready pods (round
robin, at the address the process kubelet published in the pod's ``kvflock.dev/endpoint``
annotation), and publishes the address in the Service's own ``kvflock.dev/endpoint``
annotation, from which the operator writes ``status.url`` (the URL column of
``kubectl get infsvc``). A connection that finds no ready pod waits a few seconds for one
(a restarting router) and is then closed, as kube-proxy rejects it. A pod that refuses the
connection (it died before its status said so) is skipped for the next ones and the connection
goes to another ready pod: nothing of the client's has been sent yet, so that retry is safe;
once bytes flow, a pod's death ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from kvflock.local.follow import follow
from kvflock.shared.names import ANNOTATION_ENDPOINT, LABEL_ROLE, LABEL_SERVICE, ROLE_ROUTER

__all__ = ["LocalLoadBalancer"]

log = logging.getLogger(__name__)

ENTRY_SELECTOR = f"{LABEL_ROLE}={ROLE_ROUTER}"
_MERGE_PATCH = "application/merge-patch+json"
_CHUNK = 1 << 16
# How long a new connection waits for a ready pod before it is closed.
_WAIT_FOR_ENDPOINT_SECONDS = 5.0
_ENDPOINT_CHECK_SECONDS = 0.1
# How long a pod that refused a connection gets no new ones (its status may lag its death).
_DOWN_SECONDS = 2.0


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def ready_endpoints(pods: Mapping[str, Mapping[str, Any]], namespace: str, selector: Mapping[str, str]) -> list[str]:
    """The addresses (host:port) of the ready, not deleted pods that a Service's selector picks."""
    if not selector:
        return []
    found = []
    for pod in pods.values():
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        endpoint = (meta.get("annotations") or {}).get(ANNOTATION_ENDPOINT)
        if (meta.get("namespace") != namespace or meta.get("deletionTimestamp") or not endpoint
                or any(labels.get(k) != v for k, v in selector.items()) or not _ready(pod)):
            continue
        found.append(endpoint.removeprefix("http://").removeprefix("https://").rstrip("/"))
    return sorted(found)


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter, half_close: bool) -> None:
    """Relay bytes until the source ends; then end the sink's sending side (`half_close`)."""
    try:
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        return
    if half_close:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()


@dataclass
class _Route:
    """One entry Service's local address and what its selector picks."""

    uid: str  # the entry Service's
    namespace: str
    name: str  # the InferenceService's
    selector: dict[str, str]
    port: int = 0
    server: asyncio.Server | None = None
    turns: itertools.count[int] = field(default_factory=itertools.count)
    down_until: dict[str, float] = field(default_factory=dict)  # pods that refused a connection

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LocalLoadBalancer:
    """Watches the entry Services and the pods; forwards each Service's local port to its pods."""

    def __init__(self, api_client: kubernetes.client.ApiClient, first_port: int = 30080) -> None:
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.first_port = first_port
        self._routes: dict[str, _Route] = {}  # by Service uid
        self._pods: dict[str, dict[str, Any]] = {}  # by pod uid
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._threads = [
            threading.Thread(target=self._loop.run_forever, name="loadbalancer-forward", daemon=True),
            threading.Thread(target=self._follow_services, name="loadbalancer-services", daemon=True),
            threading.Thread(target=self._follow_pods, name="loadbalancer-pods", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def urls(self) -> dict[str, str]:
        """namespace/name -> local URL of every InferenceService's entry Service."""
        with self._lock:
            return {f"{r.namespace}/{r.name}": r.url for r in self._routes.values() if r.port}

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            routes = list(self._routes.values())
            self._routes.clear()
        for route in routes:
            self._call(self._close(route))
        self._call(self._end_connections())
        self._loop.call_soon_threadsafe(self._loop.stop)
        for thread in self._threads:
            thread.join(timeout=10)

    def _call(self, coroutine: Any) -> Any:
        """Run a coroutine on the forwarding loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # ---- watching the API server -------------------------------------------------------------

    def _follow_services(self) -> None:
        follow(self.core.list_service_for_all_namespaces, self._services_listed, self._service_event, self._stop,
               "load balancer", label_selector=ENTRY_SELECTOR)

    def _services_listed(self, services: Sequence[dict[str, Any]]) -> None:
        present = {s["metadata"]["uid"] for s in services}
        for service in services:
            self._add(service)
        with self._lock:
            gone = [uid for uid in self._routes if uid not in present]
        for uid in gone:
            self._remove(uid)

    def _service_event(self, kind: str, service: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._remove(service["metadata"]["uid"])
        else:
            self._add(service)

    def _follow_pods(self) -> None:
        follow(self.core.list_pod_for_all_namespaces, self._pods_listed, self._pod_event, self._stop, "load balancer")

    def _pods_listed(self, pods: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            self._pods = {p["metadata"]["uid"]: p for p in pods}

    def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        with self._lock:
            if kind == "DELETED":
                self._pods.pop(pod["metadata"]["uid"], None)
            else:
                self._pods[pod["metadata"]["uid"]] = pod

    # ---- routes ------------------------------------------------------------------------------

    def _add(self, service: dict[str, Any]) -> None:
        meta = service["metadata"]
        uid = meta["uid"]
        selector = dict((service.get("spec") or {}).get("selector") or {})
        with self._lock:
            known = self._routes.get(uid)
            if known is not None:
                known.selector = selector  # a changed selector applies to the next connection
                return
            if self._stop.is_set():
                return
            route = _Route(uid, meta["namespace"], (meta.get("labels") or {}).get(LABEL_SERVICE, meta["name"]),
                           selector)
            self._routes[uid] = route
        self._call(self._listen(route))
        log.info("load balancer: %s/%s at %s", route.namespace, route.name, route.url)
        try:
            self.core.patch_namespaced_service(meta["name"], route.namespace,
                                               {"metadata": {"annotations": {ANNOTATION_ENDPOINT: route.url}}},
                                               _content_type=_MERGE_PATCH)
        except ApiException as exc:
            log.warning("load balancer: annotating service %s/%s failed: %s", route.namespace, meta["name"],
                        exc.reason)

    def _remove(self, uid: str) -> None:
        with self._lock:
            route = self._routes.pop(uid, None)
        if route is not None:
            log.info("load balancer: %s/%s removed; closing %s", route.namespace, route.name, route.url)
            self._call(self._close(route))

    # ---- forwarding (on the loop) ------------------------------------------------------------

    async def _listen(self, route: _Route) -> None:
        """Listen on the first free port from `first_port` that no other route holds."""
        port = self.first_port
        while True:
            with self._lock:
                taken = {r.port for r in self._routes.values()}
            if port not in taken:
                try:
                    route.server = await asyncio.start_server(
                        lambda r, w: self._forward(route, r, w), "127.0.0.1", port, reuse_address=True)
                    route.port = port
                    return
                except OSError:
                    pass
            port += 1

    async def _close(self, route: _Route) -> None:
        if route.server is not None:
            route.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(route.server.wait_closed(), 5)

    @staticmethod
    async def _end_connections() -> None:
        """Close the connections still forwarded (a client's kept-alive ones): a loop stopped with
        them pending leaves tasks that print errors when the process exits."""
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _endpoint(self, route: _Route, refused: set[str]) -> str | None:
        """The next ready pod's address (not one that `refused` this connection), waiting
        briefly while there is none."""
        deadline = time.monotonic() + _WAIT_FOR_ENDPOINT_SECONDS
        while True:
            with self._lock:
                endpoints = [e for e in ready_endpoints(self._pods, route.namespace, route.selector)
                             if e not in refused and route.down_until.get(e, 0.0) <= time.monotonic()]
            if endpoints:
                return endpoints[next(route.turns) % len(endpoints)]
            if time.monotonic() >= deadline or self._stop.is_set():
                return None
            await asyncio.sleep(_ENDPOINT_CHECK_SECONDS)

    async def _forward(self, route: _Route, client_reader: asyncio.StreamReader,
                       client_writer: asyncio.StreamWriter) -> None:
        upstream_writer: asyncio.StreamWriter | None = None
        refused: set[str] = set()
        try:
            while True:
                endpoint = await self._endpoint(route, refused)
                if endpoint is None:
                    return
                host, _, port = endpoint.rpartition(":")
                try:
                    upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
                    break
                except OSError:
                    refused.add(endpoint)
                    route.down_until[endpoint] = time.monotonic() + _DOWN_SECONDS
            to_upstream = asyncio.ensure_future(_copy(client_reader, upstream_writer, half_close=True))
            try:
                await _copy(upstream_reader, client_writer, half_close=False)
            finally:
                to_upstream.cancel()
        except asyncio.CancelledError:
            pass  # the load balancer stops; asyncio (3.11) logs a connection handler cancelled as an error
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
