"""The worker's Prometheus metrics (prefix `kvflock_`): latency histograms and token counters
fed by the server, and gauges read at scrape time from the stats the engine thread publishes,
the load and KV cache gauges also under vLLM's names for the tools that read those."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvflock.shared import metrics
from kvflock.worker.async_engine import AsyncEngine
from kvflock.worker.lora.manager import LoRAStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector(Collector):
    """Reads the engine's latest stats snapshot when Prometheus scrapes; no bookkeeping twice,
    and nothing of the engine touched from the scrape thread."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def _vllm_gauges(self) -> Iterator[GaugeMetricFamily]:
        stats = self.engine.stats
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        for name, help_text, value in [
            (metrics.VLLM_REQUESTS_RUNNING, "Requests running (vLLM's name)", stats.num_running),
            (metrics.VLLM_REQUESTS_WAITING, "Requests waiting to be scheduled (vLLM's name)", stats.num_waiting),
            (metrics.VLLM_KV_CACHE_USAGE, "KV cache usage, 1 is full (vLLM's name)", usage),
            (metrics.VLLM_GPU_CACHE_USAGE, "KV cache usage, 1 is full (vLLM's name before v0.10)", usage),
        ]:
            gauge = GaugeMetricFamily(name, help_text, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from self._vllm_gauges()
        stats = self.engine.stats
        yield GaugeMetricFamily(metrics.REQUESTS_RUNNING, "Sequences in the running batch", value=stats.num_running)
        yield GaugeMetricFamily(metrics.REQUESTS_WAITING, "Sequences waiting to be scheduled", value=stats.num_waiting)
        yield GaugeMetricFamily(metrics.KV_BLOCKS_TOTAL, "KV cache blocks that can be in use", value=stats.kv_blocks_total)
        yield GaugeMetricFamily(metrics.KV_BLOCKS_USED, "KV cache blocks in use", value=stats.kv_blocks_used)
        yield CounterMetricFamily("kvflock_preemptions", "Sequences preempted for lack of KV blocks", value=stats.num_preemptions)
        yield CounterMetricFamily("kvflock_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=stats.prefix_queried_tokens)
        yield CounterMetricFamily("kvflock_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  value=stats.prefix_hit_tokens)
        yield GaugeMetricFamily(metrics.KV_BLOCKS_CACHED, "KV blocks holding a known prefix", value=stats.kv_blocks_cached)
        if stats.lora is not None:
            yield from _lora_metrics(stats.lora)
        if stats.spec_decode is not None:
            spec = stats.spec_decode
            yield CounterMetricFamily("kvflock_spec_decode_draft_tokens", "Tokens drafted for speculative decoding",
                                      value=spec.num_drafted_tokens)
            yield CounterMetricFamily("kvflock_spec_decode_accepted_tokens", "Drafted tokens the model accepted",
                                      value=spec.num_accepted_tokens)
            yield CounterMetricFamily("kvflock_spec_decode_verifications", "Sequence steps that verified drafts",
                                      value=spec.num_verifications)
            yield GaugeMetricFamily("kvflock_spec_decode_acceptance_rate", "Accepted over drafted tokens, since start",
                                    value=spec.acceptance_rate)
            yield GaugeMetricFamily("kvflock_spec_decode_tokens_per_step",
                                    "Tokens a sequence gains per step that verifies drafts, since start",
                                    value=spec.tokens_per_step)


def _lora_metrics(lora: LoRAStats) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    yield GaugeMetricFamily("kvflock_lora_adapters_loaded", "LoRA adapters in device slots", value=lora.loaded)
    yield GaugeMetricFamily("kvflock_lora_adapters_registered", "LoRA adapters served", value=lora.registered)
    # Which ones, from which folder: the router routes each adapter's requests by it, the operator
    # loads what is missing and reloads what comes from another folder than the spec's.
    served = GaugeMetricFamily(metrics.LORA_ADAPTER_INFO, "1 for each LoRA adapter served",
                               labels=["lora_name", "path"])
    for adapter, path in sorted(lora.served):
        served.add_metric([adapter, path], 1)
    yield served
    yield CounterMetricFamily("kvflock_lora_swaps", "LoRA adapters put into a device slot", value=lora.swaps)
    yield CounterMetricFamily("kvflock_lora_disk_reads", "LoRA adapters read from disk again after leaving the CPU "
                              "copy", value=lora.disk_reads)
    for name, help_text, counts in [("kvflock_lora_requests", "Requests by LoRA adapter", lora.requests),
                                    ("kvflock_lora_generation_tokens", "Generated tokens by LoRA adapter",
                                     lora.generation_tokens)]:
        family = CounterMetricFamily(name, help_text, labels=["lora_name"])
        for adapter, value in sorted(counts.items()):
            family.add_metric([adapter], value)
        yield family


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(metrics.TIME_TO_FIRST_TOKEN, "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvflock_inter_token_latency_seconds", "Time between output tokens", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvflock_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvflock_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("kvflock_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("kvflock_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)

    def watch(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry.register(_EngineCollector(engine, model_name))
