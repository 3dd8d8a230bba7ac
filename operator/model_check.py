"""Checks of an InferenceService's model made before any worker pod exists, so that a spec that
cannot run is refused in a pass instead of when its workers crash half a minute later.

What is honest to check depends on what the operator can see of the workers' files:

- the demo model is the same bundled file everywhere; it is checked wherever the operator has it;
- a model from the Hub (hf://) is not there before its pod's init container fetches it; the
  fetcher checks what it reads and the worker what it loads;
- a path (source=path, or under a pvc or hostPath volume) is a path in the worker pod. Only where
  the operator shares the workers' filesystem (`shares_worker_files`: the local cluster, whose
  kubelet runs workers as processes on the operator's machine) does a missing path mean the
  worker will not find it either; elsewhere the operator's own filesystem proves nothing, so
  those paths are skipped and the worker's first failure reports them.

A readable model's config (HF config.json or GGUF metadata) must split evenly over
engine.tensorParallelSize, and have at least one layer per stage of engine.pipelineParallelSize. Reading a GGUF header is cheap but not free, so each file's shape is
kept by its path, size and modification time.
"""

from __future__ import annotations

import functools
from pathlib import Path

from kvflock.operator import children
from kvflock.operator.crd import InferenceServiceSpec
from kvflock.shared.hub import SCHEME as HUB_SCHEME
from kvflock.shared.model_files import DEMO_MODEL, ModelShape, demo_model_path, read_model_shape, tp_split_problem
from kvflock.shared.parallel_layout import pipeline_split_problem

# The spec field that names the model's location, by model.source.
_PATH_FIELDS = {"demo": "model.source", "path": "model.path", "pvc": "model.path", "hostPath": "model.path"}


@functools.lru_cache(maxsize=64)
def _shape(path: str, size: int, mtime_ns: int) -> ModelShape:
    return read_model_shape(Path(path))


def _cached_shape(path: Path) -> ModelShape:
    target = path
    if path.is_dir():  # a folder's shape lives in its config.json or its one .gguf file
        target = path / "config.json" if (path / "config.json").exists() else path
    stat = target.stat()
    return _shape(str(path), stat.st_size, stat.st_mtime_ns)


def model_problem(spec: InferenceServiceSpec, shares_worker_files: bool) -> str | None:
    """What makes the spec's model unable to run, naming the field; None when nothing found
    (or nothing could be checked)."""
    model = spec.model
    if model.format == "dummy" or model.source.startswith(HUB_SCHEME):
        return None
    field = _PATH_FIELDS.get(model.source)
    if field is None:  # hf://: the pod's init container fetches it; its failure is the pod's to report
        return None
    if model.source == DEMO_MODEL:
        try:
            path = demo_model_path()
        except FileNotFoundError:  # not bundled with this operator; the workers' image has it
            return None
    elif shares_worker_files:
        path = Path(children.engine_config(spec)["model"])
    else:
        return None
    if not path.exists():
        return f"{field}: {path} does not exist; the workers would not find the model"
    try:
        shape = _cached_shape(path)
    except FileNotFoundError as exc:
        return f"{field}: {exc}; the workers would not find the model"
    except (ValueError, OSError) as exc:
        return f"{field}: {exc}"
    problem = (tp_split_problem(shape, spec.engine.tensorParallelSize, "engine.tensorParallelSize")
               or pipeline_split_problem(spec.engine.pipelineParallelSize, shape.num_layers,
                                         "engine.pipelineParallelSize"))
    return None if problem is None else f"{problem} (model {path.name})"
