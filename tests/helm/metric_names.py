"""Metric names on both sides of the chart's monitoring: the sample names kvflock's workers, routers
and operator export (read from their real Prometheus registries), and the names a PromQL
expression of the alerts or dashboards reads."""

from __future__ import annotations

import re
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvflock.operator import metrics as operator_metrics
from kvflock.router.fleet import Fleet
from kvflock.router.metrics import RouterMetrics
from kvflock.worker.engine import EngineStats
from kvflock.worker.metrics import WorkerMetrics
from kvflock.worker.spec_decode.verify import SpecDecodeStats

# The samples a family of each type exposes, for families that have none yet (labelled metrics
# before their first use): histograms their buckets, sum and count, counters their _total.
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _sample_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        if not family.samples:
            names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def worker_exposition() -> str:
    """A worker's /metrics text, its engine gauges read from a stand-in engine with speculative decoding."""
    metrics = WorkerMetrics()
    stats = EngineStats(num_running=0, num_waiting=0, kv_blocks_total=100, kv_blocks_used=0, kv_blocks_cached=0,
                        num_preemptions=0, prefix_queried_tokens=0, prefix_hit_tokens=0, spec_decode=SpecDecodeStats())
    metrics.watch(SimpleNamespace(stats=stats), "demo")
    return generate_latest(metrics.registry).decode()


def exported_metric_names() -> set[str]:
    """Every sample name a worker, a router and the operator put on their /metrics."""
    router = RouterMetrics(Fleet(), clock=lambda: 0.0)
    operator = CollectorRegistry()
    operator.register(operator_metrics.actions)
    operator.register(operator_metrics.passes)
    return (_sample_names(worker_exposition()) | _sample_names(generate_latest(router.registry).decode())
            | _sample_names(generate_latest(operator).decode()))


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_WORDS = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: its identifiers that are not functions, keywords,
    label names (inside {...} or a by/without/on list), strings, durations or numbers."""
    text = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub(" ", expr))))
    return {word for word in _WORDS.findall(text) if word.lower() not in _KEYWORDS}
