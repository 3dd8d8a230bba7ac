"""Reads every worker's /ready and /metrics a few times a second into the fleet.

/ready decides whether a replica takes requests (503 while loading or draining); /metrics
gives its queue (running + waiting sequences) and KV cache size and use, which feed the load
estimate and cap the prefix index at what the worker can hold, and names the LoRA adapters it
serves (the operator loads and unloads them at run time), for adapter affinity. A worker that
was unreachable and answers again has restarted, so the router forgets which prefixes it held.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from kvflock.router.fleet import Fleet, Replica
from kvflock.router.prefix_index import PrefixIndex
from kvflock.shared import metrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.5


class Poller:
    def __init__(self, fleet: Fleet, index: PrefixIndex, client: httpx.AsyncClient,
                 interval: float = DEFAULT_INTERVAL, timeout: float = 1.0) -> None:
        self.fleet, self.index, self.client = fleet, index, client
        self.interval, self.timeout = interval, timeout

    async def run(self) -> None:
        """Poll until cancelled: every `interval`, or at once when discovery changes the fleet."""
        while True:
            self.fleet.changed.clear()
            replicas = [r for r in self.fleet.replicas.values() if r.url]  # one without an address starts
            await asyncio.gather(*(self.poll(r) for r in replicas))
            self.index.retain(self.fleet.replicas)
            try:
                await asyncio.wait_for(self.fleet.changed.wait(), self.interval)
            except TimeoutError:
                pass

    async def poll(self, replica: Replica) -> None:
        own_before = replica.in_flight
        try:
            ready = await self.client.get(f"{replica.url}/ready", timeout=self.timeout)
            scrape = await self.client.get(f"{replica.url}/metrics", timeout=self.timeout)
        except httpx.HTTPError as exc:
            if replica.reachable:
                log.warning("replica %s (%s) is unreachable: %s", replica.id, replica.url, exc)
            replica.mark_unreachable()
            return
        if not replica.reachable:
            self.index.forget(replica.id)
        replica.reachable = True
        replica.worker_ready = ready.status_code == 200
        replica.worker_draining = ready.status_code == 503 and _reason(ready) == "draining"
        if scrape.status_code == 200:
            values = metrics.parse_samples(scrape.text)
            sequences = int(values.get(metrics.REQUESTS_RUNNING, 0) + values.get(metrics.REQUESTS_WAITING, 0))
            replica.observe_queue(sequences, max(own_before, replica.in_flight))
            total = values.get(metrics.KV_BLOCKS_TOTAL, 0.0)
            if total > 0:
                replica.kv_usage = values.get(metrics.KV_BLOCKS_USED, 0.0) / total
                self.index.set_capacity(replica.id, int(total))
            replica.adapters = frozenset(metrics.parse_lora_adapters(scrape.text) or ())


def _reason(response: httpx.Response) -> str | None:
    try:
        return response.json().get("reason")
    except (ValueError, AttributeError):
        return None
