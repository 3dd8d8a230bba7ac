"""The router's Prometheus metrics (prefix `kvflock_router_`): requests per replica, retries,
routing decisions by reason, requests it refused itself, requests it holds while no replica can
take them, requests whose output is constrained (structured outputs, a forced tool choice), and,
read from the fleet at scrape time, each replica's state and requests in flight.

`prefix_blocks` / `prompt_blocks` is the router's estimate of the fleet's prefix-cache hit rate
(blocks the chosen replica was believed to hold, over all leading blocks hashed), counted
under every policy so that policies can be compared."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kvflock.router.fleet import Fleet
from kvflock.router.policy import RequestFeatures, Route
from kvflock.shared.metrics import ROUTER_HELD_REQUESTS

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _FleetCollector(Collector):
    def __init__(self, fleet: Fleet, clock: Callable[[], float]) -> None:
        self.fleet, self.clock = fleet, clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self.clock()
        in_flight = GaugeMetricFamily("kvflock_router_in_flight", "Requests in flight per replica", labels=["replica"])
        state = GaugeMetricFamily("kvflock_router_replicas", "Replicas by state", labels=["state"])
        counts = {"ready": 0, "draining": 0, "unready": 0, "saturated": 0}
        for view in self.fleet.views(now):
            in_flight.add_metric([view.id], view.in_flight)
            key = "draining" if view.draining else "unready" if not view.ready else "saturated" if view.saturated else "ready"
            counts[key] += 1
        for key, value in counts.items():
            state.add_metric([key], value)
        yield in_flight
        yield state


# vLLM's request fields that constrain the output to a grammar, beside OpenAI's response_format.
_STRUCTURED_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def constraint_kind(body: Mapping[str, Any]) -> str | None:
    """What constrains a request's output: "tool_choice" (required, or a named function),
    "structured_output" (a JSON schema, JSON object, regex, choice or grammar), or None."""
    tool_choice = body.get("tool_choice")
    if tool_choice == "required" or isinstance(tool_choice, dict):
        return "tool_choice"
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_schema", "json_object"):
        return "structured_output"
    if any(body.get(name) is not None for name in _STRUCTURED_FIELDS) or body.get("guided_json_object"):
        return "structured_output"
    return None


class RouterMetrics:
    def __init__(self, fleet: Fleet, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvflock_router_requests", "Requests sent to a replica, by its answer's status",
                                ["replica", "status"], registry=r)
        self.retries = Counter("kvflock_router_retries", "Requests sent again elsewhere, by what the replica did",
                               ["replica", "reason"], registry=r)
        self.decisions = Counter("kvflock_router_routing_decisions", "Replica choices by reason and pool",
                                 ["reason", "pool"], registry=r)
        self.refused = Counter("kvflock_router_refused", "Requests the router answered itself, by status",
                               ["status"], registry=r)
        self.broken_streams = Counter("kvflock_router_broken_streams",
                                      "Responses cut off because the replica failed after the first byte", registry=r)
        self.resumed_streams = Counter("kvflock_router_resumed_streams",
                                       "Streams continued on another replica after theirs failed mid-way", registry=r)
        self.prompt_blocks = Counter("kvflock_router_prompt_blocks", "Leading prompt blocks hashed", registry=r)
        self.prefix_blocks = Counter("kvflock_router_prefix_blocks",
                                     "Leading prompt blocks the chosen replica was believed to hold", registry=r)
        # The autoscaler reads `held` to scale up from zero replicas (kvflock.operator.workers).
        self.held = Gauge(ROUTER_HELD_REQUESTS, "Requests waiting for a replica that can take them",
                          registry=r)
        self.hold_timeouts = Counter("kvflock_router_hold_timeouts",
                                     "Held requests answered 503 because no replica became ready in time", registry=r)
        self.constrained = Counter("kvflock_router_constrained_requests",
                                   "Requests whose output is constrained, by what constrains it", ["kind"], registry=r)
        self.ttfb = Histogram("kvflock_router_time_to_first_byte_seconds", "Arrival to the first byte relayed",
                              buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_FleetCollector(fleet, clock))

    def arrived(self, body: Mapping[str, Any]) -> None:
        kind = constraint_kind(body)
        if kind is not None:
            self.constrained.labels(kind=kind).inc()

    def decided(self, route: Route, request: RequestFeatures) -> None:
        self.decisions.labels(reason=route.reason, pool=route.pool or "").inc()
        self.prompt_blocks.inc(len(request.block_hashes))
        self.prefix_blocks.inc(route.matched_blocks)
