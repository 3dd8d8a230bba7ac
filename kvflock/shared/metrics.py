"""The Prometheus metrics that one part of kvflock reads from another, and the one parser of
the text exposition they use: the operator reads the workers' and the router's, the router
reads the workers'. The worker and router export them under these names."""

from __future__ import annotations

import re

# A worker's load and KV cache (kvflock.worker.metrics).
REQUESTS_RUNNING = "kvflock_requests_running"
REQUESTS_WAITING = "kvflock_requests_waiting"
KV_BLOCKS_USED = "kvflock_kv_blocks_used"
KV_BLOCKS_TOTAL = "kvflock_kv_blocks_total"
KV_BLOCKS_CACHED = "kvflock_kv_blocks_cached"  # the value of its cache, to the operator's scale-in
TIME_TO_FIRST_TOKEN = "kvflock_time_to_first_token_seconds"
# vLLM's names for the same gauges, which others' tools read: the Gateway API Inference Extension's
# endpoint picker (its --total-queued-requests-metric, --total-running-requests-metric and
# --kv-cache-usage-percentage-metric flags), KEDA and Grafana examples; labelled with model_name, as
# vLLM labels them.
VLLM_REQUESTS_RUNNING = "vllm:num_requests_running"
VLLM_REQUESTS_WAITING = "vllm:num_requests_waiting"
VLLM_KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"  # 0..1 despite the name
VLLM_GPU_CACHE_USAGE = "vllm:gpu_cache_usage_perc"  # the same, under the name vLLM used before v0.10
# The LoRA adapters a worker serves: 1 per adapter, labelled lora_name and path (its folder).
LORA_ADAPTER_INFO = "kvflock_lora_adapter_info"
# The requests a router holds while no replica can take them (kvflock.router.metrics).
ROUTER_HELD_REQUESTS = "kvflock_router_held_requests"

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[^}]*\})?\s+(?P<value>\S+)")
_LE = re.compile(r'\ble="(?P<le>[^"]+)"')
_LABEL = re.compile(r'(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: sum over its label sets}. Lines that are not
    samples (comments, anything malformed) are skipped: a scrape never fails on one bad line."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        totals[match["name"]] = totals.get(match["name"], 0.0) + value
    return totals


def parse_lora_adapters(text: str) -> dict[str, str] | None:
    """The adapters a worker's LORA_ADAPTER_INFO lists (name -> folder), or None when it has no
    such metric (LoRA off)."""
    if f"# TYPE {LORA_ADAPTER_INFO} " not in text:
        return None
    adapters = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None and match["name"] == LORA_ADAPTER_INFO:
            labels = {m["label"]: _unescape(m["value"]) for m in _LABEL.finditer(match["labels"] or "")}
            if "lora_name" in labels:
                adapters[labels["lora_name"]] = labels.get("path", "")
    return adapters


def _unescape(value: str) -> str:
    """A label value as the exposition format escapes it (backslash, double quote, newline)."""
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


def parse_histogram_buckets(text: str, histogram: str) -> tuple[tuple[float, float], ...]:
    """A histogram's cumulative buckets as (upper bound, count), by bound."""
    buckets = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != f"{histogram}_bucket":
            continue
        le = _LE.search(match["labels"] or "")
        if le is None:
            continue
        try:
            buckets.append((float(le["le"]), float(match["value"])))
        except ValueError:
            continue
    return tuple(sorted(buckets))
