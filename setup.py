"""Maps the top-level folders onto the ``kvc`` namespace (kvc.compiler -> compiler/, ...).

The owner asked for compiler/, passes/, runtime/, models/ at the repository root, yet
nothing may be installed under top-level names such as ``runtime``; so every package
below those folders is listed here under ``kvc.``.
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
FOLDERS = {"kvc": "kvc", "kvc.compiler": "compiler", "kvc.passes": "passes", "kvc.tools": "tools",
           "kvc.runtime": "runtime", "kvc.models": "models"}


def packages_under(name: str, folder: str) -> list[str]:
    found = []
    for init in sorted((ROOT / folder).rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT / folder)
        found.append(".".join([name, *rel.parts]))
    return found


packages = [p for name, folder in FOLDERS.items() for p in packages_under(name, folder)]
setup(packages=packages, package_dir=FOLDERS,
      package_data={"kvc.models": ["presets/*.json"]})
