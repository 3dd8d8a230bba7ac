"""The router's settings: policy, pools, block size and hold timeout.

They come from `router.json`, which the operator writes into the `<name>-engine` ConfigMap
from the InferenceService (its `router` section, and the KV block size the workers hash their
prefixes with), or from a file given to `kvflock router --config`. `RouterConfig` is that file's
schema; the CRD's `router` fields are checked against it by a test, so the two cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvflock.router.policy import Policy, Pool

DEFAULT_BLOCK_SIZE = 16


class PoolConfig(BaseModel):
    """Requests whose prompt has [minPromptTokens, maxPromptTokens) tokens go to this pool."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1)
    minPromptTokens: int = Field(0, ge=0)
    maxPromptTokens: int | None = Field(None, ge=1)


class RouterConfig(BaseModel):
    """`router.json`."""

    model_config = ConfigDict(extra="forbid")

    policy: Policy = "prefix-aware"
    pools: list[PoolConfig] = Field(default_factory=list)
    holdTimeoutSeconds: int = Field(60, ge=0, le=3600)
    blockSize: int = Field(DEFAULT_BLOCK_SIZE, ge=1)
    # Whether a replica may appear where none exists (the autoscaler scales from zero when a
    # request is held), so that a request is held even while there is no worker at all.
    scaleFromZero: bool = False


@dataclass(frozen=True)
class RouterSettings:
    policy: Policy = "prefix-aware"
    pools: tuple[Pool, ...] = ()
    block_size: int = DEFAULT_BLOCK_SIZE
    hold_seconds: float = 0.0  # how long a request waits while no replica can take it
    scale_from_zero: bool = False  # hold requests while no worker exists: the autoscaler adds one


def settings_from_json(router_json: str, where: str = "router.json") -> RouterSettings:
    try:
        config = RouterConfig.model_validate(json.loads(router_json or "{}"))
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"{where}: not valid router settings: {exc}") from exc
    pools = tuple(Pool(p.name, p.minPromptTokens, p.maxPromptTokens) for p in config.pools)
    return RouterSettings(policy=config.policy, pools=pools, block_size=config.blockSize,
                          hold_seconds=float(config.holdTimeoutSeconds), scale_from_zero=config.scaleFromZero)


def settings_from_configmap(data: Mapping[str, str] | None) -> RouterSettings:
    return settings_from_json((data or {}).get("router.json", "{}"))


def read_settings_file(path: str | Path) -> RouterSettings:
    path = Path(path)
    return settings_from_json(path.read_text(), where=str(path))
