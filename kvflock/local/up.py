"""`kvflock up`, `kvflock down`, `kvflock status`: the local cluster from the command line.

`up` runs the cluster in the foreground until Ctrl-C (or SIGTERM, which `down` sends), or in
the background with ``--detach``. With ``--apply FILE`` it applies InferenceService
manifests, and with ``--ask PROMPT`` it also waits until they are Ready, showing progress,
and prints the answer to one chat request sent through the service's router: the one
command that takes a new user from nothing to an answer.

A service with ``spec.auth`` needs its API-key Secret: a Secret in the same file is applied
too, and a missing one is created with a random key (this cluster is the user's own), so the
auth example runs as it is. ``up`` then prints how to pass the key, and ``--ask`` sends it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import kubernetes.client
import yaml
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kvflock.local.localcluster import LocalCluster, StateDir, default_state_dir
from kvflock.local.process import kill_leftovers
from kvflock.operator.crd import GROUP, KIND, PLURAL, VERSION, InferenceServiceSpec, check_name, format_errors
from kvflock.shared.names import ANNOTATION_ENDPOINT, LABEL_SERVICE

__all__ = ["ask", "down", "status", "up", "wait_ready"]

_MERGE_PATCH = "application/merge-patch+json"
# The operator's Degraded reasons that waiting cannot cure: the spec must change first (a worker
# pod that failed once is replaced, and is not among them; one whose container crashed on its
# way to its first Ready will crash again).
_HOPELESS = {"InvalidSpec", "InvalidModel", "AuthSecretMissing", "WorkerStuck", "WorkerCrashed"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_pid(state: StateDir) -> int | None:
    info = state.read_info()
    pid = int(info["pid"]) if info and str(info.get("pid", "")).isdigit() else None
    return pid if pid is not None and _alive(pid) else None


def _client(state: StateDir) -> kubernetes.client.ApiClient:
    info = state.read_info()
    if info is None:
        raise ValueError(f"no local cluster runs with state dir {state.root}; start one with `kvflock up`")
    configuration = kubernetes.client.Configuration()
    configuration.host = info["api"]
    return kubernetes.client.ApiClient(configuration)


def _apply_secret(core: kubernetes.client.CoreV1Api, doc: dict[str, Any], namespace: str) -> None:
    ns = doc["metadata"].get("namespace", namespace)
    try:
        core.create_namespaced_secret(ns, doc)
    except ApiException as exc:
        if exc.status != 409:
            raise
        core.patch_namespaced_secret(doc["metadata"]["name"], ns, doc, _content_type=_MERGE_PATCH)


def _auth_ref(service: dict[str, Any]) -> tuple[str, str] | None:
    """(Secret name, key) of a service's API keys, or None without auth."""
    ref = ((service.get("spec") or {}).get("auth") or {}).get("apiKeySecretRef") or {}
    return (str(ref["name"]), str(ref["key"])) if ref.get("name") and ref.get("key") else None


def ensure_api_key_secret(api_client: kubernetes.client.ApiClient, namespace: str,
                          service: dict[str, Any]) -> str | None:
    """Create the service's API-key Secret with one random key if it does not exist; its name
    if this call created it."""
    ref = _auth_ref(service)
    if ref is None:
        return None
    core = kubernetes.client.CoreV1Api(api_client)
    key = f"sk-kvflock-{secrets.token_urlsafe(24)}"
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": ref[0], "namespace": namespace},
            "type": "Opaque", "data": {ref[1]: base64.b64encode(key.encode()).decode()}}
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status == 409:
            return None
        raise
    return ref[0]


def api_key(api_client: kubernetes.client.ApiClient, namespace: str, service: dict[str, Any]) -> str | None:
    """The first API key of a service with auth (what `--ask` sends), or None without auth."""
    ref = _auth_ref(service)
    if ref is None:
        return None
    secret = kubernetes.client.CoreV1Api(api_client).read_namespaced_secret(ref[0], namespace)
    text = base64.b64decode((secret.data or {}).get(ref[1], "")).decode()
    return next((line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")),
                None)


def key_hint(kubeconfig: Path, namespace: str, service: dict[str, Any], url: str) -> str:
    """How to pass a service's API key (read from its Secret, never printed itself)."""
    ref = _auth_ref(service)
    if ref is None:
        return ""
    name = service["metadata"]["name"]
    return (f"{namespace}/{name} requires an API key (Secret {ref[0]}, key {ref[1]}); pass it as:\n"
            f"  export KUBECONFIG={kubeconfig}\n"
            f"  export OPENAI_API_KEY=$(kubectl get secret {ref[0]} -n {namespace} "
            f"-o jsonpath='{{.data.{ref[1]}}}' | base64 -d | head -n1)\n"
            f"  curl -H \"Authorization: Bearer $OPENAI_API_KEY\" {url}/v1/models\n"
            f"  (the openai client reads OPENAI_API_KEY; `kvflock up --ask` sends the key itself)")


def read_manifests(path: Path) -> list[dict[str, Any]]:
    """The InferenceServices and Secrets of a manifest file, checked as the API server would
    check them (the CRD's own models) before anything starts: a ValueError naming the file,
    the document and the field."""
    try:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    for number, doc in enumerate(docs, 1):
        where = f"{path}: document {number}"
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: not a Kubernetes object (a mapping with apiVersion and kind)")
        is_service = doc.get("kind") == KIND and doc.get("apiVersion") == f"{GROUP}/{VERSION}"
        if not is_service and not (doc.get("kind") == "Secret" and doc.get("apiVersion") == "v1"):
            raise ValueError(f"{where}: kind {doc.get('kind')!r}: `kvflock up --apply` applies InferenceServices "
                             f"({GROUP}/{VERSION}) and Secrets only; use kubectl for the rest")
        name = (doc.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: metadata.name: required")
        if is_service:
            try:
                check_name(name)
                InferenceServiceSpec.model_validate(doc.get("spec") or {})
            except ValidationError as exc:
                raise ValueError(f"{where} ({name}): {format_errors(exc)}") from exc
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
    return docs


def apply(api_client: kubernetes.client.ApiClient, path: Path, namespace: str = "default") -> list[str]:
    """Create or update the InferenceServices (and Secrets) of a manifest file; the services' names.

    A service with auth whose API-key Secret exists nowhere gets one with a random key.
    Other kinds are for `kubectl apply` against the kubeconfig.
    """
    custom = kubernetes.client.CustomObjectsApi(api_client)
    core = kubernetes.client.CoreV1Api(api_client)
    docs = read_manifests(path)
    for doc in docs:
        if doc["kind"] == "Secret":
            _apply_secret(core, doc, namespace)
    names = []
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        ns = doc["metadata"].get("namespace", namespace)
        name = doc["metadata"]["name"]
        created = ensure_api_key_secret(api_client, ns, doc)
        if created:
            print(f"created Secret {ns}/{created} with a random API key for {name}", flush=True)
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, doc)
        except ApiException as exc:
            if exc.status != 409:
                raise
            custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, doc, _content_type=_MERGE_PATCH)
        names.append(f"{ns}/{name}")
    return names


def _progress_line(service: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    status = service.get("status") or {}
    name = service["metadata"]["name"]
    states = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        pod_status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in pod_status.get("conditions") or [])
        waiting = next((cs["state"]["waiting"].get("reason") for cs in pod_status.get("containerStatuses") or []
                        if "waiting" in (cs.get("state") or {})), None)
        states.append(f"{pod['metadata']['name']} {waiting or pod_status.get('phase', 'Pending')}"
                      f"{', ready' if ready else ''}")
    ready_count = status.get("readyReplicas") or 0
    wanted = service["spec"].get("replicas", 1)
    return f"{name}: {ready_count}/{wanted} ready" + (f" ({'; '.join(states)})" if states else " (no workers yet)")


def wait_ready(api_client: kubernetes.client.ApiClient, namespace: str, name: str, timeout: float,
               show: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """Wait until the service is Ready and its status has the local router's URL; the service.

    `show` gets a progress line whenever it changes.
    """
    custom = kubernetes.client.CustomObjectsApi(api_client)
    core = kubernetes.client.CoreV1Api(api_client)
    started = time.monotonic()
    last = ""
    service: dict[str, Any] = {}
    while time.monotonic() - started < timeout and not (stop and stop.is_set()):
        service = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        pods = api_client.sanitize_for_serialization(
            core.list_namespaced_pod(namespace, label_selector=f"{LABEL_SERVICE}={name}").items)
        line = _progress_line(service, pods)
        if show is not None and line != last:
            show(f"[{time.monotonic() - started:5.1f}s] {line}")
            last = line
        status = service.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        ready = (conditions.get("Ready") or {}).get("status") == "True"
        if ready and str(status.get("url", "")).startswith("http://127.0.0.1:"):
            return service
        degraded = conditions.get("Degraded") or {}
        if degraded.get("status") == "True" and degraded.get("reason") in _HOPELESS:
            raise ValueError(f"{namespace}/{name} cannot become Ready: {degraded['reason']}: {degraded.get('message')}")
        time.sleep(0.5)
    conditions = (service.get("status") or {}).get("conditions") or []
    summary = "; ".join(f"{c['type']}={c['status']} ({c.get('reason')}: {c.get('message')})" for c in conditions)
    raise TimeoutError(f"{namespace}/{name} was not Ready within {timeout:.0f}s: {summary or 'no status yet'}")


def ask(url: str, model: str, prompt: str, timeout: float = 120.0, key: str | None = None) -> str:
    """One chat completion through the router (retried while the router starts), with the
    service's API key when it has one."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 64, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return str(json.loads(response.read())["choices"][0]["message"]["content"]).strip()
        except (urllib.error.URLError, ConnectionError) as exc:
            retriable = not isinstance(exc, urllib.error.HTTPError) or exc.code in (502, 503)
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _apply_and_ask(state: StateDir, files: Sequence[Path], prompt: str | None, timeout: float,
                   stop: threading.Event | None = None) -> None:
    with _client(state) as api_client:
        names = [name for path in files for name in apply(api_client, path)]
        for full_name in names:
            print(f"applied InferenceService {full_name}", flush=True)
            namespace, name = full_name.split("/")
            service = kubernetes.client.CustomObjectsApi(api_client).get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name)
            hint = key_hint(state.kubeconfig, namespace, service, _url_hint(state, service))
            if hint:
                print(hint, flush=True)
        if prompt is None:
            return
        tty = sys.stdout.isatty()

        def show(line: str) -> None:
            print(("\r\033[K" + line) if tty else line, end="" if tty else "\n", flush=True)

        for full_name in names:
            namespace, name = full_name.split("/")
            service = wait_ready(api_client, namespace, name, timeout, show, stop)
            if tty:
                print()
            url, model = service["status"]["url"], service["status"].get("model", name)
            print(f"{full_name} is Ready at {url}", flush=True)
            print(f"> {prompt}\n{ask(url, model, prompt, key=api_key(api_client, namespace, service))}", flush=True)


def _url_hint(state: StateDir, service: dict[str, Any]) -> str:
    """The service's URL, or where to find it while the operator has not written it yet."""
    return str((service.get("status") or {}).get("url") or "<URL from `kubectl get infsvc`>")


def _banner(state: StateDir) -> str:
    info = state.read_info() or {}
    pods = [operator["pod"] for operator in info.get("operators") or []]
    operators = f"  operator pods electing a leader (namespace kvflock-system): {', '.join(pods)}\n" if pods else ""
    return (f"local cluster up: API server {info.get('api')}, routers from 127.0.0.1:{info.get('routerPorts')}\n"
            + operators +
            f"  export KUBECONFIG={state.kubeconfig}\n"
            f"  logs: {state.logs}/   stop: kvflock down"
            + ("" if state.root == default_state_dir() else f" --state-dir {state.root}"))


def up(state_dir: Path, api_port: int, router_port: int, files: Sequence[Path], prompt: str | None,
       detach: bool, timeout: float, once: bool = False, operators: int = 1) -> int:
    state = StateDir(state_dir)
    pid = _running_pid(state)
    if pid is not None:
        raise ValueError(f"a local cluster already runs (pid {pid}, state dir {state.root}); "
                         "stop it with `kvflock down` first")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"--apply: no such file: {path}")
        read_manifests(path)  # a bad file fails before anything starts
    if detach:
        return _up_detached(state, api_port, router_port, files, prompt, timeout, operators)
    # The API server logs every request and kopf every handler run: the cluster's own story
    # is told by the lines below, by kubectl and by `kvflock status`.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("aiohttp.access", "kopf"):
            logging.getLogger(name).setLevel(logging.WARNING)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(state.root, api_port=api_port, router_port=router_port, operators=operators)
    try:
        cluster.start()
        print(_banner(state), flush=True)
        if files:
            _apply_and_ask(state, files, prompt, timeout, stop)
        if not once:
            print("running; Ctrl-C stops everything", flush=True)
            stop.wait()
        print("stopping...", flush=True)
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)
    return 0


def _up_detached(state: StateDir, api_port: int, router_port: int, files: Sequence[Path], prompt: str | None,
                 timeout: float, operators: int) -> int:
    """Start `kvflock up` in the background, wait until it serves, then apply and ask here."""
    state.logs.mkdir(parents=True, exist_ok=True)
    state.info.unlink(missing_ok=True)
    argv = [sys.executable, "-P", "-m", "kvflock.cli", "up", "--state-dir", str(state.root),
            "--api-port", str(api_port), "--router-port", str(router_port), "--operators", str(operators)]
    with open(state.logs / "cluster.log", "ab") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + 120
    while _running_pid(state) != child.pid:
        if child.poll() is not None or time.monotonic() > deadline:
            tail = (state.logs / "cluster.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError("the local cluster did not start:\n" + "\n".join(tail))
        time.sleep(0.2)
    print(_banner(state), flush=True)
    if files:
        _apply_and_ask(state, files, prompt, timeout)
    return 0


def down(state_dir: Path, timeout: float = 120.0) -> int:
    """Stop the cluster (SIGTERM, then SIGKILL after `timeout`), and any process it left."""
    state = StateDir(state_dir)
    pid = _running_pid(state)
    if pid is None:
        print(f"no local cluster runs (state dir {state.root})")
    else:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        print(f"stopped the local cluster (pid {pid})")
    left = kill_leftovers(state.pids)
    if left:
        print(f"killed {len(left)} process(es) it left behind: {left}")
    state.info.unlink(missing_ok=True)
    return 0


def status(state_dir: Path) -> int:
    """Print the cluster's addresses, its InferenceServices and their pods; 1 when none runs."""
    state = StateDir(state_dir)
    pid = _running_pid(state)
    if pid is None:
        print(f"no local cluster runs (state dir {state.root})")
        return 1
    print(_banner(state))
    with _client(state) as api_client:
        custom = kubernetes.client.CustomObjectsApi(api_client)
        core = kubernetes.client.CoreV1Api(api_client)
        services = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        if not services:
            print("no InferenceServices")
        for service in services:
            meta, st = service["metadata"], service.get("status") or {}
            print(f"{meta['namespace']}/{meta['name']}: {st.get('readyReplicas') or 0}/"
                  f"{service['spec'].get('replicas', 1)} ready, url {st.get('url', '-')}")
            for cond in st.get("conditions") or []:
                if cond["type"] == "Degraded" and cond["status"] == "True":
                    print(f"  Degraded: {cond.get('reason')}: {cond.get('message')}")
            pods = core.list_namespaced_pod(meta["namespace"], label_selector=f"{LABEL_SERVICE}={meta['name']}")
            for pod in pods.items:
                restarts = sum(cs.restart_count for cs in pod.status.container_statuses or [])
                endpoint = (pod.metadata.annotations or {}).get(ANNOTATION_ENDPOINT, "-")
                print(f"  {pod.metadata.name}: {pod.status.phase}, restarts {restarts}, {endpoint}")
    return 0
