"""The package's parts depend on each other only as the architecture says (docs/architecture.md):
the shared names depend on nothing, the worker, router and operator only on the shared names
(and the worker on the kernels), the local cluster on the shared names and the operator's entry
points; only the CLI wires everything. And no two modules import each other, directly or not."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

# What each part may import from the others (the CLI and the package's lazy facade: anything).
ALLOWED = {
    "shared": set(),
    "kernels": set(),
    "worker": {"shared", "kernels"},
    "router": {"shared"},
    "operator": {"shared"},
    "local": {"shared", "operator.entry"},
}
# The operator's entry points, which the local cluster runs in its own process, and the CRD's
# models, which it checks the manifests it applies against.
OPERATOR_ENTRY = {"kvflock.operator.runner", "kvflock.operator.render", "kvflock.operator.crd"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by name (kvflock/ holds neither operator/, worker/ nor kernels/)."""
    found: dict[str, Path] = {}
    for package in ["kvflock", "kvflock.operator", "kvflock.worker", "kvflock.kernels"]:
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _part(module: str) -> str:
    if module in OPERATOR_ENTRY:
        return "operator.entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kvflock"


def _imports(module: str, path: Path, module_level_only: bool) -> set[str]:
    """The kvflock modules `module` imports (at its top level only, or anywhere), type-only imports excluded."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
        elif module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            skipped.update(id(child) for child in ast.walk(node) if child is not node)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def test_each_part_imports_only_what_the_architecture_allows() -> None:
    wrong = []
    for module, path in MODULES.items():
        part = _part(module)
        allowed = ALLOWED.get(part.removesuffix(".entry"))
        if allowed is None:  # the CLI and the package facade wire everything together
            continue
        for imported in _imports(module, path, module_level_only=False):
            other = _part(imported)
            if other.removesuffix(".entry") != part.removesuffix(".entry") and other not in allowed:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = {module: _imports(module, path, module_level_only=True) for module, path in MODULES.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return stack[stack.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_shared_names_need_no_torch() -> None:
    shared = sorted(m for m in MODULES if _part(m) == "shared")
    code = "import sys; sys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in shared)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
