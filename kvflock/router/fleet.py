"""The replicas the router knows, with what discovery, polling and its own requests tell it.

Discovery says which replicas exist and whether their pods are Ready or going away; the poller
says whether each worker answers /ready and how loaded it is; the proxy counts requests in
flight and marks a replica the moment it refuses one. Decisions read immutable snapshots
(`ReplicaView`) of this state. Everything here runs on the router's event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass

from kvflock.router.policy import ReplicaView
from kvflock.shared.names import DEFAULT_POOL


@dataclass(frozen=True)
class Endpoint:
    """A replica as discovery reports it."""

    id: str
    url: str
    pool: str = DEFAULT_POOL
    pod_ready: bool = True
    terminating: bool = False  # being drained or deleted by the operator
    # False when its pod will not become ready on its own: it crash-loops, cannot pull its
    # image, or failed. A starting or restarting pod may still become ready.
    may_become_ready: bool = True


@dataclass
class Replica:
    endpoint: Endpoint
    worker_ready: bool = False  # unknown until the first poll answers
    worker_draining: bool = False
    reachable: bool = False
    saturated_until: float = 0.0
    in_flight: int = 0
    queued_tokens: int = 0
    foreign: int = 0
    kv_usage: float = 0.0
    adapters: frozenset[str] = frozenset()  # the LoRA adapters it serves, from the last poll

    @property
    def id(self) -> str:
        return self.endpoint.id

    @property
    def url(self) -> str:
        return self.endpoint.url

    def view(self, now: float) -> ReplicaView:
        e = self.endpoint
        return ReplicaView(
            id=e.id, pool=e.pool, ready=e.pod_ready and self.worker_ready and self.reachable,
            draining=e.terminating or self.worker_draining, saturated=now < self.saturated_until,
            coming=e.may_become_ready,
            in_flight=self.in_flight, queued_tokens=self.queued_tokens, foreign=self.foreign,
            kv_usage=self.kv_usage, adapters=self.adapters,
        )

    def begin(self, prompt_tokens: int) -> None:
        self.in_flight += 1
        self.queued_tokens += prompt_tokens

    def end(self, prompt_tokens: int) -> None:
        self.in_flight -= 1
        self.queued_tokens -= prompt_tokens

    def observe_queue(self, worker_sequences: int, own_during_poll: int) -> None:
        """The worker held `worker_sequences` at a poll while this router had at most
        `own_during_poll` requests on it; the rest came from elsewhere."""
        self.foreign = max(0, worker_sequences - own_during_poll)

    def mark_unreachable(self) -> None:
        """It refused a connection or died mid-request: no requests until a poll finds it again."""
        self.reachable = self.worker_ready = False
        self.adapters = frozenset()  # a worker that comes back has restarted, without its adapters

    def mark_unavailable(self) -> None:
        """It answered 503 (loading or draining): no requests until a poll finds it ready."""
        self.worker_ready = False

    def mark_saturated(self, until: float) -> None:
        """It answered 429: its queue is full until `until`."""
        self.saturated_until = max(self.saturated_until, until)


class Fleet:
    def __init__(self) -> None:
        self.replicas: dict[str, Replica] = {}
        # Set whenever discovery changes the fleet, so that the poller reads new replicas at once.
        self.changed = asyncio.Event()

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """Discovery's current list: new replicas join (unready until polled), gone ones leave,
        and a replica whose address changed is a new worker."""
        current: dict[str, Replica] = {}
        for endpoint in endpoints:
            known = self.replicas.get(endpoint.id)
            if known is None or known.url != endpoint.url:
                current[endpoint.id] = Replica(endpoint)
            else:
                known.endpoint = endpoint
                current[endpoint.id] = known
        if current.keys() != self.replicas.keys() or any(current[k] is not self.replicas[k] for k in current):
            self.changed.set()
        self.replicas = current

    def get(self, replica_id: str) -> Replica | None:
        return self.replicas.get(replica_id)

    def views(self, now: float) -> list[ReplicaView]:
        return [r.view(now) for r in self.replicas.values()]

    def adapters(self) -> frozenset[str]:
        """The adapters some replica serves."""
        return frozenset().union(*(r.adapters for r in self.replicas.values()))

    def retry_after(self, now: float) -> int:
        """Whole seconds until the first saturated replica takes requests again (at least 1)."""
        pending = [r.saturated_until - now for r in self.replicas.values() if r.saturated_until > now]
        return max(1, math.ceil(min(pending))) if pending else 1
