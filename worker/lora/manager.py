"""Which adapters the engine serves and where their weights are: the registry (name -> folder),
a CPU copy of the most recently used ones (`max_cpu_loras`, read again from disk when
dropped), and the device slots (`max_loras`), both LRU. An adapter reaches a slot the first
time a step uses it; the scheduler keeps a step within `max_loras` adapters, so a step never
evicts an adapter it uses.

Owned by the engine thread; the scheduler and the runner see only names and slot numbers.
"""

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvflock.worker.config import ModelConfig
from kvflock.worker.lora.adapter import LoRAWeights, read_adapter
from kvflock.worker.lora.layers import LoRALayers
from kvflock.worker.step_plan import StepPlan


@dataclass
class LoRAStats:
    """Counters and gauges for metrics (a snapshot; copied per step)."""

    loaded: int = 0  # adapters in device slots
    registered: int = 0
    served: tuple[tuple[str, str], ...] = ()  # (name, folder) of each adapter served
    swaps: int = 0  # adapters put into a slot
    disk_reads: int = 0
    requests: Counter = field(default_factory=Counter)  # by adapter name
    generation_tokens: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class _Registered:
    path: str
    content_hash: int


class LoRAManager:
    def __init__(self, layers: LoRALayers, cfg: ModelConfig, max_loras: int, max_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, pin_memory: bool) -> None:
        self.layers = layers
        self.cfg, self.max_loras, self.max_rank, self.max_cpu_loras = cfg, max_loras, max_rank, max_cpu_loras
        self.dtype, self.pin_memory = dtype, pin_memory
        self._registry: dict[str, _Registered] = {}
        self._cpu: OrderedDict[str, LoRAWeights] = OrderedDict()
        self._slots: OrderedDict[str, int] = OrderedDict()
        self._free_slots = list(range(max_loras - 1, -1, -1))
        self.stats = LoRAStats()

    @property
    def names(self) -> list[str]:
        return list(self._registry)

    def block_hash_root(self, name: str) -> int:
        """What the adapter's KV blocks hash from: its weights, so no other adapter (nor the
        base model) shares them, and the same adapter under any name does."""
        return self._registry[name].content_hash

    def path(self, name: str) -> str:
        return self._registry[name].path

    def register(self, name: str, path: str, adapter: LoRAWeights | None = None) -> None:
        """Serve the adapter in folder `path` as `name` (read here unless given, already read)."""
        if adapter is None:
            adapter = self.read(path)
        self._registry[name] = _Registered(str(path), adapter.content_hash)
        self._keep_on_cpu(name, adapter)
        self.stats.registered, self.stats.served = len(self._registry), self._served()

    def read(self, path: str | Path) -> LoRAWeights:
        """Read and check an adapter folder (ValueError naming lora_path); any thread may call it."""
        adapter = read_adapter(path, self.cfg, self.max_rank, self.dtype)
        if self.pin_memory:
            adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        return adapter

    def unregister(self, name: str) -> None:
        del self._registry[name]
        self._cpu.pop(name, None)
        slot = self._slots.pop(name, None)
        if slot is not None:
            self._free_slots.append(slot)
        self.stats.registered, self.stats.loaded = len(self._registry), len(self._slots)
        self.stats.served = self._served()

    def _served(self) -> tuple[tuple[str, str], ...]:
        return tuple((name, registered.path) for name, registered in self._registry.items())

    def assign(self, plan: StepPlan) -> None:
        """Give each scheduled sequence with an adapter that adapter's slot, loading it first
        where it has none (into a free slot, else the least recently used one)."""
        in_step = {item.seq.lora_name for item in plan.scheduled if item.seq.lora_name is not None}
        for item in plan.scheduled:
            name = item.seq.lora_name
            if name is None:
                continue
            slot = self._slots.get(name)
            if slot is None:
                slot = self._load(name, in_step)
            self._slots.move_to_end(name)
            item.lora_slot = slot

    def _load(self, name: str, in_step: set[str]) -> int:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = next(n for n in self._slots if n not in in_step)
            slot = self._slots.pop(victim)
        adapter = self._cpu.get(name)
        if adapter is None:
            adapter = self.read(self._registry[name].path)
            self.stats.disk_reads += 1
        self._keep_on_cpu(name, adapter)
        self.layers.load(slot, adapter)
        self._slots[name] = slot
        self.stats.swaps += 1
        self.stats.loaded = len(self._slots)
        return slot

    def _keep_on_cpu(self, name: str, adapter: LoRAWeights) -> None:
        self._cpu[name] = adapter
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
