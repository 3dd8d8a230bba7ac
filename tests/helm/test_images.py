"""The Dockerfiles (no Docker engine here to build them): what they copy exists, they run as a
non-root user with the right entrypoint, and the slim operator image has all the operator imports."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .conftest import ROOT

DOCKER = ROOT / "docker"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # index of the FROM it belongs to


def parse(path: Path) -> list[Instruction]:
    """Dockerfile instructions, with continuation lines joined and heredoc bodies left out."""
    instructions: list[Instruction] = []
    lines = iter(path.read_text().splitlines())
    stage = -1
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        keyword, _, arguments = line.strip().partition(" ")
        heredoc = re.search(r"<<-?'?(\w+)'?", arguments)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), arguments.strip(), stage))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = instructions[-1].stage
    return [i for i in instructions if i.stage == last]


def arg_default(instructions: list[Instruction], name: str) -> str:
    for instruction in instructions:
        if instruction.keyword == "ARG" and instruction.arguments.startswith(f"{name}="):
            return shlex.split(instruction.arguments.partition("=")[2])[0]
    raise AssertionError(f"no ARG {name}=... default")


DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_there_is_an_operator_and_a_worker_dockerfile() -> None:
    assert [p.name for p in DOCKERFILES] == ["operator.Dockerfile", "worker.Dockerfile"]


WHEEL_FOLDER = "dist/"  # where `make wheel` puts the wheel (scripts/build-wheel.sh)


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_every_copied_file_exists_or_is_the_wheel(path: Path) -> None:
    copies = [i for i in parse(path) if i.keyword == "COPY" and "--from=" not in i.arguments]
    assert copies
    for copy in copies:
        *sources, _ = shlex.split(copy.arguments)
        for source in sources:
            if source != WHEEL_FOLDER:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such file in the repository"
    assert "scripts/build-wheel.sh $(BIN)/python dist" in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_image_installs_the_checked_wheel_at_the_locked_versions(path: Path) -> None:
    runs = " ".join(i.arguments for i in parse(path) if i.keyword == "RUN")
    assert "dist/kvflock-*-py3-none-any.whl" in runs and "--constraint /tmp/kvflock/lock.txt" in runs
    assert "pip install ." not in runs


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_image_runs_as_a_numeric_non_root_user(path: Path) -> None:
    users = [i.arguments for i in final_stage(parse(path)) if i.keyword == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {users[-1]} (the kubelet checks runAsNonRoot by uid)"


def test_worker_image_is_cuda_with_torch_and_serves() -> None:
    instructions = parse(DOCKER / "worker.Dockerfile")
    assert arg_default(instructions, "CUDA_IMAGE").startswith("nvidia/cuda:")
    assert arg_default(instructions, "TORCH_INDEX_URL").startswith("https://download.pytorch.org/whl/cu")
    runs = " ".join(i.arguments for i in instructions if i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs
    entrypoint = [i.arguments for i in final_stage(instructions) if i.keyword == "ENTRYPOINT"][-1]
    assert json.loads(entrypoint) == ["kvflock", "serve"]


def test_operator_image_is_slim_python_running_the_operator() -> None:
    instructions = parse(DOCKER / "operator.Dockerfile")
    final = final_stage(instructions)
    assert final[0].arguments == "python:${PYTHON_VERSION}-slim"
    entrypoint = [i.arguments for i in final if i.keyword == "ENTRYPOINT"][-1]
    command = [i.arguments for i in final if i.keyword == "CMD"][-1]
    assert json.loads(entrypoint) + json.loads(command) == ["kvflock", "operator"]


def _distribution_closure(names: set[str]) -> set[str]:
    """The distributions `names` need, with their own requirements (no extras), recursively."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


# Imports the operator's modules with every installed module outside `allowed` hidden, as in the image
# (optional imports, such as the kubernetes client's of kubernetes_validate, then fail as they would there).
_IMPORT_WITH_ONLY_ALLOWED = """
import json, pkgutil, sys
allowed = set(json.loads(sys.argv[1]))
for module in pkgutil.iter_modules():
    if module.name not in allowed:
        sys.modules.setdefault(module.name, None)  # None: import fails, find_spec finds nothing
import kvflock.cli, kvflock.operator.runner, kvflock.operator.render
"""


def test_operator_image_packages_cover_everything_the_operator_imports() -> None:
    packages = set(arg_default(parse(DOCKER / "operator.Dockerfile"), "OPERATOR_PACKAGES").split())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dependencies = {Requirement(d).name.lower() for d in pyproject["project"]["dependencies"]}
    assert packages <= dependencies, f"not in pyproject.toml's dependencies: {packages - dependencies}"

    installed = _distribution_closure(packages)
    allowed = {
        module for module, dists in importlib.metadata.packages_distributions().items()
        if any(d.lower().replace("_", "-") in installed for d in dists)
    } | set(sys.stdlib_module_names) | {"kvflock"}
    result = subprocess.run([sys.executable, "-c", _IMPORT_WITH_ONLY_ALLOWED, json.dumps(sorted(allowed))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"the operator image's packages are not enough:\n{result.stderr}"
