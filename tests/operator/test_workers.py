"""The operator's calls to workers: addresses, /ready and /metrics, /admin/drain, LoRA adapter loads."""

from __future__ import annotations

from kvflock.operator.workers import load_adapter, probe, request_drain, unload_adapter, worker_url
from kvflock.shared.metrics import LORA_ADAPTER_INFO, parse_lora_adapters, parse_samples
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .conftest import FakeWorkers


def test_worker_url_prefers_the_endpoint_annotation_over_the_pod_ip() -> None:
    annotations = {"kvflock.dev/endpoint": "http://127.0.0.1:9000/"}
    pod = {"metadata": {"annotations": annotations}, "status": {"podIP": "10.1.2.3"}}
    assert worker_url(pod) == "http://127.0.0.1:9000"
    assert worker_url({"metadata": {}, "status": {"podIP": "10.1.2.3"}}) == "http://10.1.2.3:8000"
    assert worker_url({"metadata": {}, "status": {}}) is None


def test_parse_samples_sums_label_sets_and_skips_comments() -> None:
    text = (
        "# HELP kvflock_requests_running Requests running\n"
        "# TYPE kvflock_requests_running gauge\n"
        'kvflock_requests_running{model="a"} 2\n'
        'kvflock_requests_running{model="b"} 3.0\n'
        "kvflock_kv_blocks_total 1e3\n"
        "garbage line\n"
    )
    assert parse_samples(text) == {"kvflock_requests_running": 5.0, "kvflock_kv_blocks_total": 1000.0}


def test_lora_adapters_are_read_from_the_exposition_as_prometheus_client_writes_it() -> None:
    registry = CollectorRegistry()

    class Adapters:
        def collect(self):
            family = GaugeMetricFamily(LORA_ADAPTER_INFO, "served", labels=["lora_name", "path"])
            family.add_metric(["sql", "/a/sql"], 1)
            family.add_metric(["odd", '/a/"quoted" \\ new\nline'], 1)
            yield family

    registry.register(Adapters())
    text = generate_latest(registry).decode()
    assert parse_lora_adapters(text) == {"sql": "/a/sql", "odd": '/a/"quoted" \\ new\nline'}
    assert parse_lora_adapters("kvflock_requests_running 1\n") is None  # LoRA off


def test_probe_reads_readiness_load_and_kv_usage(fake_workers: FakeWorkers) -> None:
    fake_workers.busy["w"] = 3
    result = probe(f"{fake_workers.url}/w", timeout=2)
    assert (result.ready, result.running, result.waiting, result.kv_usage, result.error) == (True, 3, 0, 0.25, None)
    assert result.in_flight == 3


def test_probe_names_the_lora_adapters_a_worker_serves_and_none_without_lora(fake_workers: FakeWorkers) -> None:
    assert probe(f"{fake_workers.url}/w", timeout=2).adapters is None  # LoRA off: not a worker that has adapters
    fake_workers.adapters["w"] = {"sql": "/a/sql", "ft:poetry/v2": "/a/poetry"}
    assert probe(f"{fake_workers.url}/w", timeout=2).adapters == {"sql": "/a/sql", "ft:poetry/v2": "/a/poetry"}
    fake_workers.adapters["w"] = {}
    assert probe(f"{fake_workers.url}/w", timeout=2).adapters == {}


def test_adapter_loads_and_unloads_reach_the_worker_and_its_refusal_comes_back(fake_workers: FakeWorkers) -> None:
    assert load_adapter(f"{fake_workers.url}/w", "sql", "/a/sql", timeout=2, admin_token=b"admin") is None
    assert unload_adapter(f"{fake_workers.url}/w", "sql", timeout=2) is None
    assert fake_workers.adapter_calls == [("load_lora_adapter", {"lora_name": "sql", "lora_path": "/a/sql"},
                                           "Bearer admin"),
                                          ("unload_lora_adapter", {"lora_name": "sql"}, None)]
    problem = load_adapter(f"{fake_workers.url}/w", "bad", "/missing", timeout=2)
    assert problem == "lora_path: '/missing' is not a PEFT adapter folder"
    assert "unreachable" in (load_adapter("http://127.0.0.1:9", "sql", "/a", timeout=1) or "")


def test_probe_of_an_unreachable_worker_records_the_error() -> None:
    result = probe("http://127.0.0.1:9", timeout=1)
    assert result.ready is None and result.running is None
    assert result.error is not None and "unreachable" in result.error


def test_drain_request_reaches_the_worker_and_its_progress_is_read(fake_workers: FakeWorkers) -> None:
    fake_workers.busy["w"] = 1
    assert probe(f"{fake_workers.url}/w", timeout=2).drained is None  # not asked while not draining
    assert request_drain(f"{fake_workers.url}/w", timeout=2) is None
    assert fake_workers.drained == ["w"]
    draining = probe(f"{fake_workers.url}/w", timeout=2, draining=True)
    assert (draining.ready, draining.drained) == (False, False)
    fake_workers.busy["w"] = 0
    assert probe(f"{fake_workers.url}/w", timeout=2, draining=True).drained is True
    assert "404" in (request_drain(f"{fake_workers.url}/w/x", timeout=2) or "")
