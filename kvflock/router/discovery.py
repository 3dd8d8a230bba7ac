"""Where the workers are: a static list (`--worker`), or an InferenceService's worker Pods.

Kubernetes discovery lists and watches the Pods labelled `kvflock.dev/service=<name>,
kvflock.dev/role=worker` with the synchronous kubernetes client in a thread, and hands each
new list of endpoints to the event loop. A pod's address is its `kvflock.dev/endpoint`
annotation (the local cluster's process kubelet writes it) or `podIP:8000`; its pool is its
`kvflock.dev/pool` label; a pod that is not Ready, being deleted, or marked draining by the
operator takes no new requests. A pod without an address yet is listed too (it is starting), and
one whose container crash-loops or cannot start, or that failed, is marked as not coming: the
router waits for a starting replica, never for one of those. Each (re)list also reads the `<name>-engine` ConfigMap, so
pool and policy changes reach the router within one watch period.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kvflock.router.config import RouterSettings, settings_from_configmap
from kvflock.router.fleet import Endpoint, Fleet
from kvflock.shared.names import (
    ANNOTATION_DRAINING,
    ANNOTATION_ENDPOINT,
    DEFAULT_POOL,
    LABEL_POOL,
    LABEL_ROLE,
    LABEL_SERVICE,
    ROLE_WORKER,
    WORKER_PORT,
)

log = logging.getLogger(__name__)

# Container waiting reasons of a pod that will not become ready without a change.
_HOPELESS_WAITING = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName"}
)

# Seconds a watch runs before the pods and the ConfigMap are listed afresh.
WATCH_PERIOD = 10


def parse_worker_flag(value: str) -> Endpoint:
    """`--worker [POOL=]URL`: a static replica, optionally in a pool."""
    pool, sep, url = value.partition("=")
    if not sep or "://" in pool:
        pool, url = DEFAULT_POOL, value
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"worker: {value!r} is not [POOL=]http://HOST:PORT")
    return Endpoint(id=url, url=url, pool=pool)


def _may_become_ready(status: Mapping[str, Any]) -> bool:
    """Whether the pod is starting or running, rather than failed or stuck in a loop; a
    container that just died (terminated, not yet restarted) counts as crash-looping."""
    if status.get("phase") in ("Failed", "Succeeded"):
        return False
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        if (state.get("waiting") or {}).get("reason") in _HOPELESS_WAITING or "terminated" in state:
            return False
    return True


def endpoint_from_pod(pod: Mapping[str, Any]) -> Endpoint:
    """A worker Pod (as a dict, camelCase) -> its endpoint (with no URL while it has no address)."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    annotations = metadata.get("annotations") or {}
    address = annotations.get(ANNOTATION_ENDPOINT)
    if address:
        url = address.rstrip("/") if "://" in address else f"http://{address}"
    elif status.get("podIP"):
        url = f"http://{status['podIP']}:{WORKER_PORT}"
    else:
        url = ""
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    terminating = bool(metadata.get("deletionTimestamp")) or ANNOTATION_DRAINING in annotations
    pool = (metadata.get("labels") or {}).get(LABEL_POOL, DEFAULT_POOL)
    return Endpoint(id=metadata["name"], url=url, pool=pool, pod_ready=ready and bool(url), terminating=terminating,
                    may_become_ready=_may_become_ready(status))


class KubernetesDiscovery:
    """Lists and watches one InferenceService's worker Pods (and its engine ConfigMap)."""

    def __init__(self, service: str, namespace: str, api_client: Any, read_configmap: bool = True) -> None:
        self.service, self.namespace, self.api_client = service, namespace, api_client
        self.read_configmap = read_configmap
        self._stopped = threading.Event()
        self._watch: Any = None

    @property
    def selector(self) -> str:
        return f"{LABEL_SERVICE}={self.service},{LABEL_ROLE}={ROLE_WORKER}"

    @property
    def configmap_name(self) -> str:
        # The operator's name for it: kvflock.operator.children.engine_configmap_name.
        return f"{self.service}-engine"

    async def run(self, fleet: Fleet, on_settings: Callable[[RouterSettings], None]) -> None:
        """Feed `fleet` until cancelled."""
        loop = asyncio.get_running_loop()

        def publish(endpoints: list[Endpoint]) -> None:
            loop.call_soon_threadsafe(fleet.update, endpoints)

        def publish_settings(settings: RouterSettings) -> None:
            loop.call_soon_threadsafe(on_settings, settings)

        thread = threading.Thread(target=self._watch_forever, args=(publish, publish_settings),
                                  name="kvflock-router-discovery", daemon=True)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stopped.set()
            if self._watch is not None:
                self._watch.stop()

    def _watch_forever(self, publish: Callable[[list[Endpoint]], None],
                       publish_settings: Callable[[RouterSettings], None]) -> None:
        import kubernetes.client
        import kubernetes.watch

        core = kubernetes.client.CoreV1Api(self.api_client)
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                if self.read_configmap:
                    self._read_settings(core, publish_settings)
                listed = core.list_namespaced_pod(self.namespace, label_selector=self.selector)
                pods = {p.metadata.name: self.api_client.sanitize_for_serialization(p) for p in listed.items}
                publish(_endpoints(pods))
                self._watch = kubernetes.watch.Watch()
                for event in self._watch.stream(core.list_namespaced_pod, self.namespace,
                                                label_selector=self.selector,
                                                resource_version=listed.metadata.resource_version,
                                                timeout_seconds=WATCH_PERIOD):
                    pod = self.api_client.sanitize_for_serialization(event["object"])
                    name = pod.get("metadata", {}).get("name")
                    if event["type"] == "DELETED":
                        pods.pop(name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        pods[name] = pod
                    publish(_endpoints(pods))
                backoff = 0.5
            except Exception as exc:  # the API server restarts, a watch expires (410): list again
                if self._stopped.is_set():
                    return
                log.warning("watching the worker pods of %s/%s failed: %s", self.namespace, self.service, exc)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _read_settings(self, core: Any, publish_settings: Callable[[RouterSettings], None]) -> None:
        """Publish the ConfigMap's settings (defaults while it does not exist); a bad one is
        logged and the settings in force stay."""
        import kubernetes.client

        try:
            configmap = core.read_namespaced_config_map(self.configmap_name, self.namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
            configmap = None
        try:
            settings = settings_from_configmap(configmap.data if configmap is not None else None)
        except ValueError as exc:
            log.error("ConfigMap %s/%s: %s", self.namespace, self.configmap_name, exc)
            return
        publish_settings(settings)


def _endpoints(pods: Mapping[str, Mapping[str, Any]]) -> list[Endpoint]:
    return sorted((endpoint_from_pod(pod) for pod in pods.values()), key=lambda e: e.id)
