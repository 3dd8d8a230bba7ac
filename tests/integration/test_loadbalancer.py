"""The local cluster's load balancer against the API server: an entry Service gets a fixed
127.0.0.1 URL that forwards each connection to a ready pod the Service selects."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import kubernetes.client
import pytest

from kvflock.local.loadbalancer import LocalLoadBalancer
from kvflock.local.process import free_port
from tests.operator.conftest import ServerThread, api_client, apiserver, kube_config  # noqa: F401  (fixtures)
from tests.polling import wait_for

pytestmark = pytest.mark.timeout(60)

NS = "default"
MERGE = "application/merge-patch+json"


class Backend:
    """An HTTP server that answers every GET with its own name, in two chunks."""

    def __init__(self, name: str) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in (name[:1], name[1:]):
                    self.wfile.write(f"{len(part):x}\r\n{part}\r\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    servers = [Backend("router-a"), Backend("router-b")]
    yield servers
    for server in servers:
        server.stop()


def _pod(core: kubernetes.client.CoreV1Api, name: str, url: str, ready: bool, role: str = "router") -> None:
    labels = {"kvflock.dev/service": "chat", "kvflock.dev/role": role}
    core.create_namespaced_pod(NS, {"metadata": {"name": name, "labels": labels,
                                                 "annotations": {"kvflock.dev/endpoint": url}},
                                    "spec": {"containers": [{"name": "c", "image": "x"}]}})
    _set_ready(core, name, ready)


def _set_ready(core: kubernetes.client.CoreV1Api, name: str, ready: bool) -> None:
    status = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    core.patch_namespaced_pod_status(name, NS, {"status": status}, _content_type=MERGE)


def test_entry_service_url_forwards_to_the_ready_pods_it_selects(
        api_client: kubernetes.client.ApiClient, backends: list[Backend]) -> None:  # noqa: F811
    core = kubernetes.client.CoreV1Api(api_client)
    _pod(core, "chat-router", backends[0].url, ready=True)
    _pod(core, "chat-router-2", backends[1].url, ready=False)
    _pod(core, "chat-w-0", backends[1].url, ready=True, role="worker")  # not selected
    selector = {"kvflock.dev/service": "chat", "kvflock.dev/role": "router"}
    core.create_namespaced_service(NS, {"metadata": {"name": "chat", "labels": {**selector}},
                                        "spec": {"selector": selector, "ports": [{"port": 80}]}})
    first_port = free_port()
    balancer = LocalLoadBalancer(api_client, first_port)
    balancer.start()
    try:
        url = wait_for(lambda: (core.read_namespaced_service("chat", NS).metadata.annotations or {})
                       .get("kvflock.dev/endpoint"), what="the service's local URL")
        assert url == f"http://127.0.0.1:{first_port}" and balancer.urls() == {f"{NS}/chat": url}
        assert {httpx.get(url, timeout=10).text for _ in range(4)} == {"router-a"}, "only ready, selected pods"

        _set_ready(core, "chat-router-2", True)
        wait_for(lambda: {httpx.get(url, timeout=10).text for _ in range(4)} == {"router-a", "router-b"},
                 what="the second pod to get connections")

        for name in ("chat-router", "chat-router-2"):
            _set_ready(core, name, False)
        wait_for(lambda: _refused(url), what="connections to be closed without a ready pod")

        core.delete_namespaced_service("chat", NS)
        wait_for(lambda: balancer.urls() == {}, what="the route to go")
    finally:
        balancer.stop()


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=15)
    except httpx.TransportError:
        return True
    return False
