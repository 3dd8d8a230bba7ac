"""spec.model.source hf://org/name@revision end to end in the local cluster: a fake Hub
(tests/fake_hub.py) serves a tiny model built by the test, HF_ENDPOINT in spec.env points the
pods at it, the worker pod's fetch-model init container fills a node folder (hubCache.hostPath)
before the worker starts, and the service becomes Ready and answers through its router."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvflock.shared.hub import HubSource, model_dir
from tests.fake_hub import FakeHub

from .conftest import Cluster, wait_for
from .load import client_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SERVICE, REPO, REVISION = "tiny", "tiny-org/tiny-llama", "v1"


@pytest.fixture(scope="module")
def hub(tiny_models: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub({REPO: {REVISION: tiny_models["llama"]}}) as fake:
        yield fake


def _ready(cluster: Cluster) -> bool:
    conditions = ((cluster.get("infsvc", SERVICE) or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_an_hf_model_is_fetched_by_the_init_container_and_served(cluster: Cluster, hub: FakeHub, tmp_path: Path,
                                                                 tiny_models: dict[str, Path]) -> None:
    cache = tmp_path / "node-hub-cache"
    manifest = tmp_path / "tiny.json"
    manifest.write_text(json.dumps({
        "apiVersion": "kvflock.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": SERVICE},
        "spec": {"model": {"source": f"hf://{REPO}@{REVISION}", "hubCache": {"hostPath": str(cache)}},
                 "env": [{"name": "HF_ENDPOINT", "value": hub.url}],
                 "replicas": 1, "engine": {"dtype": "float32", "maxModelLen": 256},
                 "resources": {"gpusPerReplica": 0, "cpu": "1", "memory": "1Gi"}},
    }))
    cluster.kubectl("apply", "-f", str(manifest))
    wait_for(lambda: _ready(cluster), 240, f"{SERVICE} Ready")

    (worker,) = cluster.workers(SERVICE)
    (init,) = worker["status"]["initContainerStatuses"]
    assert init["name"] == "fetch-model" and init["state"]["terminated"]["reason"] == "Completed"
    folder = Path(model_dir(cache, HubSource(REPO, REVISION)))
    assert (folder / "model.safetensors").read_bytes() == (tiny_models["llama"] / "model.safetensors").read_bytes()
    log = (cluster.state_dir / "logs" / f"default_{worker['metadata']['name']}_fetch-model.log").read_text()
    assert "model.safetensors: downloaded and verified" in log

    # The tiny model has no tokenizer: a prompt of token ids, through the service's router.
    client = client_for(cluster.get("infsvc", SERVICE)["status"]["url"])
    reply = client.completions.create(model=SERVICE, prompt=[1, 2, 3, 4], max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
