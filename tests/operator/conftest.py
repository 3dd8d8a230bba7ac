"""Fixtures of the operator tests: an API server on 127.0.0.1 and the real operator against it."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import kmock
import kubernetes.client
import pytest

from kvflock.local.apiserver import ApiServer
from kvflock.operator.render import render_crd
from tests.polling import wait_for  # noqa: F401  (re-exported to the tests here)


# What a CRD schema keeps in `unvalidated`: the structure (so objects are still pruned and
# defaulted), none of the bounds, enums, patterns or CEL rules.
_STRUCTURE = {"type", "properties", "items", "additionalProperties", "default", "description", "nullable",
              "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"}


def _structure_only(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    kept = {k: v for k, v in schema.items() if k in _STRUCTURE}
    if "properties" in kept:
        kept["properties"] = {name: _structure_only(sub) for name, sub in kept["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(kept.get(key), dict):
            kept[key] = _structure_only(kept[key])
    return kept


def unvalidated(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD as an older one (or a cluster without CEL) has it: the API server stores specs
    that only the operator's own checks refuse."""
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        version["schema"]["openAPIV3Schema"] = _structure_only(schema)
    return crd


class ServerThread:
    """An event loop in a thread serving `ApiServer` (with our CRD, or the one given) on 127.0.0.1."""

    def __init__(self, crd: dict[str, Any] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.api = ApiServer()
        self.api.install_crd(crd or render_crd())
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.api, kmock.Server(self.api) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the API server did not start")

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


@pytest.fixture
def apiserver(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """The API server; a test marked ``unvalidated_crd`` gets it with `unvalidated`'s CRD."""
    unchecked = request.node.get_closest_marker("unvalidated_crd") is not None
    server = ServerThread(unvalidated(render_crd()) if unchecked else None)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def kube_config(apiserver: ServerThread) -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    configuration.host = apiserver.url
    return configuration


@pytest.fixture
def api_client(kube_config: kubernetes.client.Configuration) -> Iterator[kubernetes.client.ApiClient]:
    with kubernetes.client.ApiClient(kube_config) as client:
        yield client


class FakeWorkers:
    """Workers' HTTP endpoints on 127.0.0.1, one path prefix per pod: /<pod>/ready, /metrics, /admin/drain."""

    def __init__(self) -> None:
        self.busy: dict[str, int] = {}  # requests in flight per pod (default 0)
        self.held: dict[str, int] = {}  # requests a router pod holds (reported when set)
        self.drained: list[str] = []  # pods that got POST /admin/drain, in order
        self.drain_authorization: list[str | None] = []  # the Authorization header of each
        self.adapters: dict[str, dict[str, str]] = {}  # LoRA adapter -> folder a pod's /metrics lists (absent: LoRA off)
        self.adapter_calls: list[tuple[str, dict, str | None]] = []  # (path, body, Authorization) of each
        workers = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, code: int, text: str = "") -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                pod, _, path = self.path.strip("/").partition("/")
                if path == "ready":
                    self._reply(503 if pod in workers.drained else 200)
                elif path == "metrics":
                    running = workers.busy.get(pod, 0)
                    held = f"kvflock_router_held_requests {workers.held[pod]}\n" if pod in workers.held else ""
                    lora = "".join(["# TYPE kvflock_lora_adapter_info gauge\n"] + [
                        f'kvflock_lora_adapter_info{{lora_name="{n}",path="{p}"}} 1.0\n'
                        for n, p in workers.adapters[pod].items()
                    ]) if pod in workers.adapters else ""
                    self._reply(200, f"kvflock_requests_running {running}\nkvflock_requests_waiting 0\n"
                                     f"kvflock_kv_blocks_used 10\nkvflock_kv_blocks_total 40\n{held}{lora}")
                elif path == "admin/drain":
                    draining, running = pod in workers.drained, workers.busy.get(pod, 0)
                    self._reply(200, json.dumps({"draining": draining, "in_flight": running,
                                                 "drained": draining and running == 0}))
                else:
                    self._reply(404)

            def do_POST(self) -> None:
                pod, _, path = self.path.strip("/").partition("/")
                if path == "admin/drain":
                    workers.drained.append(pod)
                    workers.drain_authorization.append(self.headers.get("Authorization"))
                    self._reply(200, "{}")
                elif path in ("v1/load_lora_adapter", "v1/unload_lora_adapter"):
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    workers.adapter_calls.append((path.removeprefix("v1/"), body, self.headers.get("Authorization")))
                    if body.get("lora_path") == "/missing":  # as a worker refuses a folder that is not there
                        message = "lora_path: '/missing' is not a PEFT adapter folder"
                        self._reply(400, json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                                               "param": "lora_path", "code": None}}))
                    else:  # what a worker serves changes as a worker's would
                        served = workers.adapters.setdefault(pod, {})
                        if path.endswith("unload_lora_adapter"):
                            del served[body["lora_name"]]
                        else:
                            served[body["lora_name"]] = body["lora_path"]
                        self._reply(200, "Success")
                else:
                    self._reply(404)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def fake_workers() -> Iterator[FakeWorkers]:
    workers = FakeWorkers()
    yield workers
    workers.stop()
