"""Fixtures of the chart tests: the real helm binary, and the chart rendered by it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kvflock"
VALUES_ALL = Path(__file__).with_name("values-all.yaml")
RELEASE, NAMESPACE = "kvflock", "ml"

Render = Callable[..., list[dict[str, Any]]]


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def venv_tool(name: str, installer: str) -> Path:
    """A binary `make venv` installs next to the venv's Python (with `installer`)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"no {name} at {path}: run `make venv` ({installer} installs it)")
    return path


@pytest.fixture(scope="session")
def helm() -> Path:
    return venv_tool("helm", "scripts/install-k8s-tools.sh")


def template_args(values: Sequence[Path] = (), sets: Sequence[str] = (), chart: Path = CHART) -> list[str]:
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--include-crds"]
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """`render(values=[...], sets=[...])`: the manifests `helm template` prints, parsed."""

    def _render(values: Sequence[Path] = (), sets: Sequence[str] = (), chart: Path = CHART) -> list[dict[str, Any]]:
        out = run_helm(helm, *template_args(values, sets, chart)).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return _render


@pytest.fixture(scope="session")
def default_manifests(render: Render) -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="session")
def all_manifests(render: Render) -> list[dict[str, Any]]:
    return render(values=[VALUES_ALL])


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        m for m in of_kind(manifests, kind)
        if component is None or m["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


@pytest.fixture
def notes_chart(tmp_path: Path) -> Path:
    """A copy of the chart whose NOTES.txt is rendered into a manifest (`helm template` skips NOTES)."""
    chart = tmp_path / "kvflock"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "NOTES.txt")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "NOTES.txt") . | quote }}\n')
    return chart
