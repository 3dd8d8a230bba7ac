"""The router's settings file (`router.json`) and the CRD's `router` fields cannot drift: the
operator writes one from the other, and both declare the same choices, defaults and bounds."""

from __future__ import annotations

import json

import pytest

from kvflock.operator.children import engine_settings
from kvflock.operator.crd import InferenceServiceSpec, PoolSpec, RouterSpec
from kvflock.router.config import PoolConfig, RouterConfig, read_settings_file, settings_from_configmap
from kvflock.router.policy import Pool


def _constraints(model: type, field: str) -> tuple:
    info = model.model_fields[field]
    bounds = sorted((type(m).__name__, repr(m)) for m in info.metadata)
    return info.annotation, info.get_default(call_default_factory=True), bounds


@pytest.mark.parametrize("field", ["policy", "holdTimeoutSeconds"])
def test_router_fields_match_the_crd(field: str) -> None:
    assert _constraints(RouterConfig, field) == _constraints(RouterSpec, field)


@pytest.mark.parametrize("field", ["minPromptTokens", "maxPromptTokens"])
def test_pool_fields_match_the_crd(field: str) -> None:
    assert _constraints(PoolConfig, field) == _constraints(PoolSpec, field)


def test_the_operator_writes_what_the_router_reads() -> None:
    spec = InferenceServiceSpec.model_validate({
        "model": {"source": "demo"},
        "engine": {"kvCache": {"blockSize": 32}},
        "router": {"policy": "least-loaded", "holdTimeoutSeconds": 5,
                   "pools": [{"name": "short", "maxPromptTokens": 64, "replicas": 1},
                             {"name": "long", "minPromptTokens": 64}]},
    })
    settings = settings_from_configmap(engine_settings(spec))
    assert settings.policy == "least-loaded" and settings.block_size == 32 and settings.hold_seconds == 5
    assert settings.pools == (Pool("short", 0, 64), Pool("long", 64, None))


def test_a_bad_settings_file_names_the_field(tmp_path) -> None:
    path = tmp_path / "router.json"
    path.write_text(json.dumps({"policy": "random"}))
    with pytest.raises(ValueError, match="policy"):
        read_settings_file(path)
