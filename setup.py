"""Maps the top-level folders into the one `kvflock` package (DESIGN.md: a top-level `operator`
package cannot exist) and lets setuptools find every package below them, so none is forgotten.
All other metadata is in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = {"kvflock": "kvflock", "kvflock.operator": "operator", "kvflock.worker": "worker", "kvflock.kernels": "kernels"}

setup(
    package_dir=FOLDERS,
    packages=[f"{package}{'.' + sub if sub else ''}" for package, folder in FOLDERS.items()
              for sub in ["", *find_packages(folder)]],
)
