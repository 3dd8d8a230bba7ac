"""The suite runs against the installed package: nothing puts the repository root on sys.path,
where operator/, worker/ and kernels/ would shadow the standard library and installed packages
(transformers imports the `kernels` package)."""

import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

import kvflock

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_root_is_not_on_sys_path():
    entries = {Path(entry or os.getcwd()).resolve() for entry in sys.path}
    assert ROOT not in entries


def test_top_level_names_come_from_installed_packages_not_the_checkout():
    for name in ["kernels", "operator"]:
        origin = importlib.util.find_spec(name).origin
        assert origin in ("built-in", "frozen") or Path(origin).resolve().parent != ROOT / name, (name, origin)


def test_every_package_folder_has_an_init_file():
    """setuptools finds packages by their __init__.py: a folder without one is left out of the wheel."""
    folders = [Path(kvflock.__path__[0])]  # kvflock/, then the folders mapped into it (operator/, worker/, ...)
    folders += [Path(importlib.util.find_spec(f"kvflock.{module.name}").submodule_search_locations[0])
                for module in pkgutil.iter_modules(kvflock.__path__) if module.ispkg]
    for folder in folders:
        for directory in {path.parent for path in folder.rglob("*.py")}:
            assert (directory / "__init__.py").exists(), f"{directory} has modules but no __init__.py"


def test_bench_helpers_do_not_shadow_installed_modules():
    """`python bench/x.py` puts bench/ first on sys.path, so a bench module named like an installed one hides it."""
    for script in (ROOT / "bench").glob("*.py"):
        assert importlib.util.find_spec(script.stem) is None, f"bench/{script.name} shadows an installed module"
