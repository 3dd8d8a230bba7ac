"""The operator's model pre-checks: what it can read is checked (the path exists, its config splits
over engine.tensorParallelSize); what it cannot see as the workers do is left to them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvflock.operator.crd import InferenceServiceSpec
from kvflock.operator.model_check import model_problem
from kvflock.shared.model_files import demo_model_path, read_model_shape


def spec(model: dict[str, Any], tp: int = 1, pp: int = 1) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate(
        {"model": model, "engine": {"tensorParallelSize": tp, "pipelineParallelSize": pp},
         "resources": {"gpusPerReplica": 0}})


def hf_folder(tmp_path: Path, heads: int, kv_heads: int, ffn: int, layers: int = 4) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": ffn,
         "num_hidden_layers": layers}))
    return tmp_path


def test_the_demo_model_refuses_a_tensor_parallel_size_that_does_not_divide_its_heads() -> None:
    problem = model_problem(spec({"source": "demo"}, tp=2), shares_worker_files=False)
    assert problem is not None and problem.startswith("engine.tensorParallelSize: 2 does not divide the model's num_heads=9")
    assert model_problem(spec({"source": "demo"}), shares_worker_files=False) is None


def test_a_missing_path_is_named_where_the_operator_sees_the_workers_files_and_skipped_elsewhere() -> None:
    missing = spec({"source": "path", "path": "/no/such/model"})
    problem = model_problem(missing, shares_worker_files=True)
    assert problem == "model.path: /no/such/model does not exist; the workers would not find the model"
    assert model_problem(missing, shares_worker_files=False) is None


def test_an_hf_config_is_read_for_its_heads(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, heads=12, kv_heads=4, ffn=1024)
    assert model_problem(spec({"source": "path", "path": str(folder)}, tp=4), shares_worker_files=True) is None
    problem = model_problem(spec({"source": "path", "path": str(folder)}, tp=8), shares_worker_files=True)
    assert problem is not None and "num_heads=12" in problem


def test_more_pipeline_stages_than_layers_are_refused_naming_the_field(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, heads=8, kv_heads=2, ffn=256, layers=4)
    assert model_problem(spec({"source": "path", "path": str(folder)}, pp=4), shares_worker_files=True) is None
    problem = model_problem(spec({"source": "path", "path": str(folder)}, pp=8), shares_worker_files=True)
    assert problem == f"engine.pipelineParallelSize: 8 stages exceed the model's 4 layers; use at most 4 (model {folder.name})"


def test_the_demo_models_30_layers_are_read_from_its_gguf_header() -> None:
    assert read_model_shape(demo_model_path()).num_layers == 30
    assert model_problem(spec({"source": "demo"}, pp=8), shares_worker_files=False) is None


def test_an_unreadable_config_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    problem = model_problem(spec({"source": "path", "path": str(tmp_path)}), shares_worker_files=True)
    assert problem is not None and problem.startswith("model.path: ") and "not valid JSON" in problem


def test_a_hub_model_is_left_to_the_pods_init_container() -> None:
    assert model_problem(spec({"source": "hf://org/name@main"}, tp=2), shares_worker_files=True) is None
