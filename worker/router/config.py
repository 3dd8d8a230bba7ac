"""The router's settings: policy, pools, block size and hold timeout, from the InferenceService.

The operator writes them into the `<name>-engine` ConfigMap: `router.json` is the spec's
`router` section (validated here by the CRD's own model, so a bad file fails naming the
field) and `engine.json` carries the KV block size the workers hash their prefixes with.
`kvflock router --config FILE` reads the same `router.json` from a file instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kvflock.operator.crd import RouterSpec
from kvflock.worker.router.policy import Policy, Pool

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class RouterSettings:
    policy: Policy = "prefix-aware"
    pools: tuple[Pool, ...] = ()
    block_size: int = DEFAULT_BLOCK_SIZE
    hold_seconds: float = 0.0  # how long a request waits while no replica can take it


def settings_from_json(router_json: str, engine_json: str | None = None, where: str = "router.json") -> RouterSettings:
    """Settings from the ConfigMap's `router.json` (and `engine.json` for the block size)."""
    try:
        spec = RouterSpec.model_validate(json.loads(router_json or "{}"))
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"{where}: not a valid router section of an InferenceService: {exc}") from exc
    pools = tuple(Pool(p.name, p.minPromptTokens, p.maxPromptTokens) for p in spec.pools)
    block_size = DEFAULT_BLOCK_SIZE
    if engine_json:
        engine: Any = json.loads(engine_json)
        block_size = int(engine.get("kvCache", {}).get("blockSize", DEFAULT_BLOCK_SIZE))
    return RouterSettings(policy=spec.policy, pools=pools, block_size=block_size,
                          hold_seconds=float(spec.holdTimeoutSeconds))


def settings_from_configmap(data: Mapping[str, str] | None) -> RouterSettings:
    data = data or {}
    return settings_from_json(data.get("router.json", "{}"), data.get("engine.json"))


def read_settings_file(path: str | Path) -> RouterSettings:
    """A `router.json` file (the InferenceService's `router` section as JSON)."""
    path = Path(path)
    return settings_from_json(path.read_text(), where=str(path))
