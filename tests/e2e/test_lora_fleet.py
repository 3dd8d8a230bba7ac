"""LoRA adapters in the local cluster: `spec.adapters` loaded into the running workers, asked for
through the router with the openai client, added and removed with kubectl apply, no pod restarted.

The tests share one cluster and run in order. One replica on purpose (CI has two cores): the
router's adapter affinity with several replicas is tests/router/test_policy.py's.
"""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from tests.lora_adapters import write_adapter

from .conftest import Cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SERVICE = "smollm2-lora"
BASE = "smollm2-135m-instruct"
PROMPT = "The three best things about the sea are"
# SmolLM2-135M's projection shapes: all a PEFT adapter for it depends on.
SMOLLM2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
MANIFEST: dict[str, Any] = {
    "apiVersion": "kvflock.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": SERVICE},
    "spec": {
        "model": {"source": "demo", "format": "gguf", "servedName": BASE},
        "replicas": 1,
        "engine": {"dtype": "float32", "maxModelLen": 512, "maxNumSeqs": 4, "maxNumBatchedTokens": 256,
                   "lora": {"maxLoras": 2, "maxLoraRank": 8, "maxCpuLoras": 4}},
        "resources": {"gpusPerReplica": 0, "cpu": "1", "memory": "2Gi"},
        "probes": {"startupSeconds": 120},
        "drainTimeoutSeconds": 10,
    },
}


@pytest.fixture(scope="module")
def adapters(cluster: Cluster) -> dict[str, Path]:
    """Three random rank-8 adapters for SmolLM2, in folders the worker processes can read."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = LlamaForCausalLM(SMOLLM2)
    root = cluster.state_dir / "adapters"
    return {name: write_adapter(root / name, model, rank=8, alpha=16, seed=seed, std=1.0)
            for seed, name in enumerate(["sql", "poetry", "french"], start=1)}


def _apply(cluster: Cluster, adapters: dict[str, Path], names: list[str], broken: bool = False) -> None:
    manifest = copy.deepcopy(MANIFEST)
    manifest["spec"]["adapters"] = [{"name": n, "source": {"path": str(adapters[n])}} for n in names]
    if broken:
        manifest["spec"]["adapters"].append({"name": "broken", "source": {"path": str(cluster.state_dir / "none")}})
    path = cluster.state_dir / "lora.yaml"
    path.write_text(yaml.safe_dump(manifest))
    cluster.kubectl("apply", "-f", str(path))


def _status(cluster: Cluster) -> dict[str, Any]:
    return (cluster.get("infsvc", SERVICE) or {}).get("status") or {}


def _held(cluster: Cluster) -> dict[str, int]:
    """Replicas that serve each adapter, as the status says."""
    return {a["name"]: a["replicas"] for a in _status(cluster).get("adapters") or []}


def _condition(cluster: Cluster, kind: str) -> dict[str, Any]:
    return next((c for c in _status(cluster).get("conditions") or [] if c["type"] == kind), {})


def _router(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{_status(cluster)['url']}/v1", api_key="unused", max_retries=0, timeout=60)


def _worker(cluster: Cluster) -> openai.OpenAI:
    (pod,) = cluster.workers(SERVICE)
    endpoint = pod["metadata"]["annotations"]["kvflock.dev/endpoint"]
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=60)


def _complete(client: openai.OpenAI, model: str) -> str:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    return reply.choices[0].text


def _events(cluster: Cluster) -> str:
    return cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={SERVICE}")


def _listed(client: openai.OpenAI) -> set[str]:
    return {m.id for m in client.models.list().data}


def _pods(cluster: Cluster) -> dict[str, tuple[str, int]]:
    """Each worker pod's UID and restart count."""
    return {p["metadata"]["name"]: (p["metadata"]["uid"], p["status"]["containerStatuses"][0]["restartCount"])
            for p in cluster.workers(SERVICE)}


def test_a_service_with_two_adapters_serves_each_through_the_router(cluster: Cluster, adapters: dict[str, Path]) -> None:
    _apply(cluster, adapters, ["sql", "poetry"])
    wait_for(lambda: _condition(cluster, "Ready").get("status") == "True", 180, "Ready")
    wait_for(lambda: _held(cluster) == {"sql": 1, "poetry": 1}, 60, "both adapters loaded")
    router = _router(cluster)
    wait_for(lambda: {BASE, "sql", "poetry"} <= _listed(router), 30, "the router to list the adapters")

    worker = _worker(cluster)
    base = _complete(router, BASE)
    for name in ("sql", "poetry"):
        through_router = _complete(router, name)
        assert through_router == _complete(worker, name)  # greedy: the same adapter answers the same
        assert through_router != base, f"adapter {name} answered as the base model"
    assert _complete(router, "sql") != _complete(router, "poetry")


def test_a_third_adapter_added_with_kubectl_apply_serves_without_a_pod_restart(
        cluster: Cluster, adapters: dict[str, Path]) -> None:
    before = _pods(cluster)
    _apply(cluster, adapters, ["sql", "poetry", "french"])
    wait_for(lambda: _held(cluster).get("french") == 1, 60, "the third adapter loaded")
    router = _router(cluster)
    wait_for(lambda: "french" in _listed(router), 30, "the router to list the third adapter")
    assert _complete(router, "french") == _complete(_worker(cluster), "french")
    assert _pods(cluster) == before


def test_an_adapter_that_cannot_load_degrades_the_service_naming_it(
        cluster: Cluster, adapters: dict[str, Path]) -> None:
    _apply(cluster, adapters, ["sql", "poetry", "french"], broken=True)
    wait_for(lambda: _condition(cluster, "Degraded").get("reason") == "AdapterLoadFailed", 60, "Degraded")
    message = _condition(cluster, "Degraded")["message"]
    assert "'broken'" in message and "lora_path" in message, message  # the worker's own words
    assert "AdapterLoadFailed" in _events(cluster)
    assert _complete(_router(cluster), "sql")  # the others still serve


def test_a_removed_adapter_is_refused_with_404_and_the_pods_stay(cluster: Cluster, adapters: dict[str, Path]) -> None:
    before = _pods(cluster)
    _apply(cluster, adapters, ["sql", "french"])
    wait_for(lambda: _condition(cluster, "Degraded").get("status") == "False", 60, "Degraded to clear")
    router = _router(cluster)
    wait_for(lambda: "poetry" not in _listed(router), 60, "the router to stop listing the removed adapter")
    assert set(_held(cluster)) == {"sql", "french"}
    with pytest.raises(openai.NotFoundError) as refused:
        _complete(router, "poetry")
    assert "poetry" in str(refused.value)
    assert _complete(router, "sql")
    assert _pods(cluster) == before


def test_a_restarted_worker_serves_the_adapters_again(cluster: Cluster, adapters: dict[str, Path]) -> None:
    (pod,) = cluster.workers(SERVICE)
    name, restarts = pod["metadata"]["name"], pod["status"]["containerStatuses"][0]["restartCount"]
    loads = _events(cluster).count("Loaded adapter")
    os.kill(int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("process://")), signal.SIGKILL)
    wait_for(lambda: _pods(cluster)[name][1] > restarts, 60, "the worker to restart")
    wait_for(lambda: _condition(cluster, "Ready").get("status") == "True", 120, "Ready again")
    wait_for(lambda: _held(cluster) == {"sql": 1, "french": 1}, 60, "the adapters served again")
    router = _router(cluster)
    assert _complete(router, "sql") == _complete(_worker(cluster), "sql")
    # It loaded them itself as it started, from the list in its engine ConfigMap, before it was Ready.
    assert _events(cluster).count("Loaded adapter") == loads
