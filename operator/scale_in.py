"""Which workers a scale-in removes first: those whose going costs the fleet least.

A worker that is not ready serves nothing and goes first. Of the ready ones, the one with the
least work in flight (what it has in flight is drained, or continued on another replica by the
router, each continuation paying a prefill there), then the one with the least cache (KV blocks
holding known prefixes, whose hits the fleet loses with it), then the newest. A worker not
probed yet counts as idle and cacheless: nothing says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One worker that a scale-in could remove, as its last probe saw it."""

    name: str
    index: int
    ready: bool
    in_flight: int | None = None  # requests running or waiting
    cached_blocks: int | None = None  # KV blocks holding a known prefix


def removal_cost(candidate: Candidate) -> tuple[bool, int, int, int]:
    """What removing the worker costs, compared as a tuple: lower goes first."""
    return candidate.ready, candidate.in_flight or 0, candidate.cached_blocks or 0, -candidate.index


def removal_order(candidates: Sequence[Candidate]) -> list[str]:
    """The candidates' names, the cheapest to remove first."""
    return [c.name for c in sorted(candidates, key=removal_cost)]
