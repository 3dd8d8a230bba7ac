"""The CRD's engine fields and the engine's own settings (EngineConfig) cannot drift apart: each
field of `spec.engine` (and `spec.model.format`) is an EngineConfig field of the same name up to
case, or the one `ENGINE_FIELD_NAMES` gives, with the same default and the same bounds; and what
the operator writes into a worker's engine config file is a valid EngineConfig."""

from __future__ import annotations

import json
import typing
from typing import Any

import annotated_types
import pytest
from kvflock.operator import children
from kvflock.operator.children import Owner
from kvflock.operator.crd import EngineSpec, InferenceServiceSpec, ModelSpec, PoolEngineSpec, engine_field_name
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kvflock.worker.config import EngineConfig

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")

# Where the CRD differs from the engine on purpose, and why.
DEFAULT_DIFFERS = {
    # The operator mounts an emptyDir there; the engine has no folder of its own to assume.
    "kvCache.diskPath": "the operator's mount point of the disk tier",
    # Required inside the optional `speculative` section, whose absence is the engine's None (off).
    "speculative.method": "speculative decoding is off by the section's absence",
}
CRD_NARROWER = {
    # GPUs a worker pod asks for; the engine also runs other rank counts (e.g. 3 CPU ranks in tests).
    "tensorParallelSize": "GPU counts a pod asks for",
    # A replica is one pod on one node: 8 GPUs at most, in all.
    "pipelineParallelSize": "GPU counts a pod asks for",
    "contextParallelSize": "GPU counts a pod asks for",
}


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Dotted path -> field, through nested models (kvCache, speculative)."""
    fields = {}
    for name, field in model.model_fields.items():
        nested = [a for a in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        fields.update(_leaf_fields(nested[0], f"{prefix}{name}.") if nested else {f"{prefix}{name}": field})
    return fields


def _choices(field: FieldInfo) -> set[Any] | None:
    args = [field.annotation, *typing.get_args(field.annotation)]
    literal = [a for a in args if typing.get_origin(a) is typing.Literal]
    return set(typing.get_args(literal[0])) if literal else None


def _bounds(field: FieldInfo) -> dict[str, Any]:
    kinds = (annotated_types.Ge, annotated_types.Le, annotated_types.Gt, annotated_types.Lt)
    return {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata if isinstance(m, kinds)}


CRD_FIELDS = {path: field for path, field in _leaf_fields(EngineSpec).items()}
PAIRS = [(f"engine.{path}", field, EngineConfig.model_fields[engine_field_name(path)])
         for path, field in CRD_FIELDS.items()] + [
    ("model.format", ModelSpec.model_fields["format"], EngineConfig.model_fields["load_format"])]


def test_every_engine_field_of_the_crd_is_an_engine_setting() -> None:
    unknown = [path for path in CRD_FIELDS if engine_field_name(path) not in EngineConfig.model_fields]
    assert unknown == [], "map them in crd.ENGINE_FIELD_NAMES, or add them to EngineConfig"


@pytest.mark.parametrize(("path", "crd", "engine"), PAIRS, ids=[p for p, _, _ in PAIRS])
def test_crd_field_has_the_engines_default(path: str, crd: FieldInfo, engine: FieldInfo) -> None:
    if path.removeprefix("engine.") in DEFAULT_DIFFERS:
        return
    assert crd.default is not PydanticUndefined, f"{path} has no default"
    assert crd.default == engine.default


@pytest.mark.parametrize(("path", "crd", "engine"), PAIRS, ids=[p for p, _, _ in PAIRS])
def test_crd_field_has_the_engines_bounds_and_choices(path: str, crd: FieldInfo, engine: FieldInfo) -> None:
    if path.removeprefix("engine.") in CRD_NARROWER:
        accepted, bounds = _choices(crd), _bounds(engine)
        if accepted is None:  # a range: its ends within the engine's
            accepted = {_bounds(crd)["Ge"], _bounds(crd)["Le"]}
        assert all(engine.annotation is int and bounds["Ge"] <= v <= bounds.get("Le", v)
                   for v in accepted), f"{path} accepts what the engine refuses"
        return
    assert _bounds(crd) == _bounds(engine)
    assert _choices(crd) == _choices(engine)


def test_pool_engine_fields_have_the_services_bounds() -> None:
    for name, field in PoolEngineSpec.model_fields.items():
        assert _bounds(field) == _bounds(EngineSpec.model_fields[name]), name


@pytest.mark.parametrize("engine", [
    {},
    {"tensorParallelSize": 2, "dtype": "bfloat16", "maxModelLen": 8192, "maxNumSeqs": 128, "prefixCaching": False,
     "quantization": "int4", "kvCache": {"blockSize": 32, "dtype": "fp8"}},
    {"kvCache": {"cpuOffloadGiB": 4, "gpuMemoryUtilization": 0.5}},
    {"kvCache": {"diskOffloadGiB": 10}, "speculative": {"method": "ngram", "numTokens": 3}},
    {"speculative": {"method": "draft", "draftModel": "/models/small"}},
])
def test_the_workers_engine_config_file_is_a_valid_engine_config(engine: dict[str, Any], tmp_path) -> None:
    spec = InferenceServiceSpec.model_validate({"resources": {"gpusPerReplica": 0}, "engine": engine})
    path = tmp_path / "engine.json"
    path.write_text(children.engine_configmap(OWNER, spec)["data"]["engine.json"])
    config = EngineConfig.from_file(path)
    assert config.max_num_seqs == spec.engine.maxNumSeqs
    assert config.block_size == spec.engine.kvCache.blockSize
    assert config.enable_prefix_caching == spec.engine.prefixCaching


def test_worker_command_has_the_config_file_and_no_engine_flags() -> None:
    spec = InferenceServiceSpec.model_validate({"engine": {"maxNumSeqs": 8, "kvCache": {"blockSize": 32}}})
    command = children.worker_template(OWNER, spec)["containers"][0]["command"]
    assert command[:4] == ["kvflock", "serve", "--config", "/etc/kvflock/engine.json"]
    flags = {arg.removeprefix("--").replace("-", "_") for arg in command if arg.startswith("--")}
    assert flags & set(EngineConfig.model_fields) == set()
    env = children.worker_template(OWNER, spec)["containers"][0]["env"]
    assert "KVFLOCK_ENGINE_CONFIG" not in {var["name"] for var in env}


def test_disk_tier_path_is_also_a_flag_where_the_pod_mounts_it() -> None:
    spec = InferenceServiceSpec.model_validate({"engine": {"kvCache": {"diskOffloadGiB": 10}}})
    template = children.worker_template(OWNER, spec)
    command = template["containers"][0]["command"]
    assert command[command.index("--kv-offload-disk-path") + 1] == "/var/cache/kvflock/kv"
    assert {"name": "kv-disk", "mountPath": "/var/cache/kvflock/kv"} in template["containers"][0]["volumeMounts"]


def test_a_change_of_engine_settings_rolls_the_workers() -> None:
    before = InferenceServiceSpec.model_validate({"engine": {"maxNumSeqs": 8}})
    after = InferenceServiceSpec.model_validate({"engine": {"maxNumSeqs": 16}})
    assert children.spec_hash(OWNER, before) != children.spec_hash(OWNER, after)
    assert children.engine_configmap(OWNER, before) != children.engine_configmap(OWNER, after)


def test_router_hashes_prefixes_with_the_workers_block_size() -> None:
    spec = InferenceServiceSpec.model_validate({"engine": {"kvCache": {"blockSize": 32}}})
    data = children.engine_configmap(OWNER, spec)["data"]
    assert json.loads(data["router.json"])["blockSize"] == 32
    assert json.loads(data["engine.json"])["block_size"] == 32
