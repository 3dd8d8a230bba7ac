"""Routing decisions: which replica serves a request, from the request's features and a snapshot
of the replicas.

No I/O and no clock: the app hands in immutable snapshots and gets back a `Route` or a
`Refusal`, so every decision is unit-testable. The `Router` keeps only what a decision must
remember between requests: the prefix index, the hash ring and the round-robin counters.

Prefix-aware routing is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
2018) keyed by the prompt's first block, preceded by a longest-prefix match against the
`PrefixIndex`: a replica that already holds the prompt's leading blocks wins while its load stays
within `load_factor` times the average, so one hot prefix spreads over a second replica (the
next one on the ring, which then caches it too) instead of overloading the first. A small
absolute slack on top of the bound keeps bursts of one prefix together at low load, where
batching them is nearly free.

A request whose `model` names a LoRA adapter goes only to replicas that serve it (adapter
affinity), whatever the policy; among them the policy decides as usual. Its block hashes
start from the adapter's root (`RequestFeatures.adapter`), so its prefixes are never taken for
the base model's or another adapter's, as in the workers' prefix caches.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from kvflock.router.prefix_index import PrefixIndex

Policy = Literal["prefix-aware", "least-loaded", "round-robin"]
POLICIES: tuple[Policy, ...] = ("prefix-aware", "least-loaded", "round-robin")

# Why a replica was chosen; the router's metrics count decisions by these.
REASON_PREFIX_HIT = "prefix_hit"
REASON_PREFIX_OVERLOADED = "prefix_overloaded"
REASON_CONSISTENT_HASH = "consistent_hash"
REASON_LEAST_LOADED = "least_loaded"
REASON_ROUND_ROBIN = "round_robin"

DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_LOAD_SLACK = 4
_VIRTUAL_NODES = 64
_MAX_RINGS = 32


@dataclass(frozen=True)
class Pool:
    """Requests whose prompt has [min_tokens, max_tokens) tokens go to the replicas labelled `name`."""

    name: str
    min_tokens: int = 0
    max_tokens: int | None = None

    def admits(self, prompt_tokens: int) -> bool:
        return prompt_tokens >= self.min_tokens and (self.max_tokens is None or prompt_tokens < self.max_tokens)


@dataclass(frozen=True)
class ReplicaView:
    """One replica as a decision sees it."""

    id: str
    pool: str
    ready: bool  # the pod is Ready and the worker's /ready answers 200
    draining: bool = False
    coming: bool = True  # if not ready, it may still become ready (starting, not crash-looping)
    saturated: bool = False  # it answered 429 (queue full) within its Retry-After
    in_flight: int = 0  # this router's requests outstanding on it
    queued_tokens: int = 0  # their prompt tokens
    foreign: int = 0  # sequences the worker held at the last poll beyond this router's (other routers')
    kv_usage: float = 0.0
    adapters: frozenset[str] = frozenset()  # the LoRA adapters its /metrics lists

    @property
    def load(self) -> int:
        """Outstanding requests: this router's own count is exact and current; what other
        routers send is known only from the last poll."""
        return self.in_flight + self.foreign

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    @property
    def may_serve(self) -> bool:
        """Serving, or worth waiting for: starting, and neither going away nor failing."""
        return self.serving or (self.coming and not self.draining)


@dataclass(frozen=True)
class RequestFeatures:
    """What routing needs to know of a request."""

    prompt_tokens: int
    block_hashes: tuple[int, ...] = ()
    adapter: str | None = None  # the LoRA adapter its `model` names (None: the base model)


@dataclass(frozen=True)
class Route:
    replica: str
    reason: str
    pool: str | None = None  # None when no pool applies (none configured, or none deployed)
    matched_blocks: int = 0  # leading prompt blocks the replica is believed to hold already


@dataclass(frozen=True)
class Refusal:
    status: int  # 503: no replica is ready; 429: every ready replica's queue is full
    message: str
    pool: str | None = None


class HashRing:
    """Consistent hashing: each replica owns `_VIRTUAL_NODES` points on a 64-bit ring; a key
    belongs to the first points clockwise. Adding or removing a replica moves only its share."""

    def __init__(self) -> None:
        # One ring per member set (one per pool); rebuilt only when a set changes.
        self._rings: dict[frozenset[str], tuple[list[int], list[str]]] = {}

    def walk(self, key: int, members: Sequence[str]) -> Iterator[str]:
        """The members in ring order starting at `key`, each once."""
        points, owners = self._ring(frozenset(members))
        start = bisect_left(points, key % (1 << 64))
        seen: set[str] = set()
        for i in range(len(points)):
            owner = owners[(start + i) % len(points)]
            if owner not in seen:
                seen.add(owner)
                yield owner

    def _ring(self, members: frozenset[str]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(members)
        if ring is None:
            if len(self._rings) >= _MAX_RINGS:  # the fleet changed; old member sets are history
                self._rings.clear()
            points = sorted((_hash64(f"{m}#{v}".encode()), m) for m in members for v in range(_VIRTUAL_NODES))
            ring = self._rings[members] = ([p for p, _ in points], [m for _, m in points])
        return ring


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def pool_members(pools: Sequence[Pool], prompt_tokens: int, replicas: Sequence[ReplicaView]
                 ) -> tuple[str | None, list[ReplicaView]]:
    """The pool a prompt of this length belongs to, and that pool's replicas.

    With no pools configured, no pool admitting the length, or no replica deployed in the
    admitting pool, every replica is a member: a request is better served by the wrong pool
    than refused by a fleet that has capacity."""
    for pool in pools:
        if pool.admits(prompt_tokens):
            members = [r for r in replicas if r.pool == pool.name]
            return (pool.name, members) if members else (None, list(replicas))
    return None, list(replicas)


def load_bound(candidates: Sequence[ReplicaView], load_factor: float, slack: int) -> int:
    """The most requests a replica may hold, counting the new one: `load_factor` times the
    average load after placing it, rounded up (so that at least one candidate is always
    within), plus `slack`. The slack exists because a batching engine serves a few more
    sequences at almost no cost, while sending a prefix elsewhere costs a whole prefill."""
    total = sum(r.load for r in candidates) + 1
    return math.ceil(load_factor * total / len(candidates)) + slack


def least_loaded(candidates: Sequence[ReplicaView]) -> ReplicaView:
    return min(candidates, key=lambda r: (r.load, r.queued_tokens, r.kv_usage, r.id))


class Router:
    """Chooses replicas under one policy and remembers what later decisions need."""

    def __init__(self, policy: Policy, pools: Sequence[Pool] = (), load_factor: float = DEFAULT_LOAD_FACTOR,
                 load_slack: int = DEFAULT_LOAD_SLACK, index: PrefixIndex | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
        if load_factor < 1.0:
            raise ValueError(f"load_factor: must be >= 1.0 (1.0 balances strictly), got {load_factor}")
        self.policy: Policy = policy
        self.pools = tuple(pools)
        if load_slack < 0:
            raise ValueError(f"load_slack: must be >= 0, got {load_slack}")
        self.load_factor, self.load_slack = load_factor, load_slack
        self.index = index if index is not None else PrefixIndex()
        self._ring = HashRing()
        self._turns: dict[str | None, int] = {}

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaView],
               exclude: frozenset[str] = frozenset()) -> Route | Refusal:
        """The replica for `request`, skipping `exclude` (replicas this request already tried),
        draining, unready and saturated ones; or why none can take it. An adapter's request
        goes to a replica that serves the adapter: of its pool if one there does, else of any."""
        if request.adapter is not None:
            replicas = [r for r in replicas if request.adapter in r.adapters]
        pool, members = pool_members(self.pools, request.prompt_tokens, replicas)
        serving = [r for r in members if r.serving and r.id not in exclude]
        candidates = [r for r in serving if not r.saturated]
        if not candidates:
            where = f" in pool {pool!r}" if pool else ""
            if request.adapter is not None:
                where += f" serving adapter {request.adapter!r}"
            if serving:
                return Refusal(429, f"every ready replica{where} has a full queue; retry later", pool)
            return Refusal(503, f"no replica{where} is ready to serve", pool)
        if self.policy == "round-robin":
            route = self._round_robin(pool, candidates)
        elif self.policy == "least-loaded" or not request.block_hashes:
            route = Route(least_loaded(candidates).id, REASON_LEAST_LOADED, pool)
        else:
            route = self._prefix_aware(pool, request, members, candidates)
        if request.block_hashes:
            held = self.index.matched_blocks(request.block_hashes, [route.replica])[route.replica]
            self.index.record(route.replica, request.block_hashes)
            route = replace(route, matched_blocks=held)
        return route

    def _round_robin(self, pool: str | None, candidates: list[ReplicaView]) -> Route:
        turn = self._turns.get(pool, 0)
        self._turns[pool] = turn + 1
        ordered = sorted(candidates, key=lambda r: r.id)
        return Route(ordered[turn % len(ordered)].id, REASON_ROUND_ROBIN, pool)

    def _prefix_aware(self, pool: str | None, request: RequestFeatures, members: list[ReplicaView],
                      candidates: list[ReplicaView]) -> Route:
        bound = load_bound(candidates, self.load_factor, self.load_slack)
        within = {r.id: r for r in candidates if r.load + 1 <= bound}
        matches = self.index.matched_blocks(request.block_hashes, (r.id for r in candidates))
        best = max(matches.values(), default=0)
        if best > 0:
            holders = [r for r in candidates if matches[r.id] == best and r.id in within]
            if holders:
                return Route(least_loaded(holders).id, REASON_PREFIX_HIT, pool)
        reason = REASON_PREFIX_OVERLOADED if best > 0 else REASON_CONSISTENT_HASH
        # The ring spans every member, ready or not, so that a replica's share of prefixes
        # stays put while another one flaps.
        # The bound admits at least the least-loaded candidate, so the walk always ends here.
        ring = self._ring.walk(request.block_hashes[0], [r.id for r in members])
        replica_id = next(r for r in ring if r in within)
        return Route(replica_id, reason, pool)
