"""The distribution's generic top-level names belong to shardflow alone."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGES = PYPROJECT["tool"]["setuptools"]["packages"]


def test_declared_packages_are_the_project_folders():
    assert set(PACKAGES) == {"shard_tools", "pipeline", "train", "benchmarks"}
    for name in PACKAGES:
        assert (REPO / name / "__init__.py").exists()


def test_no_installed_dependency_ships_a_module_of_the_same_name():
    owners = md.packages_distributions()
    for name in PACKAGES:
        others = [d for d in owners.get(name, []) if d.lower() != "shardflow"]
        assert not others, f"{name} is also installed by {others}"
        spec = importlib.util.find_spec(name)
        assert spec is not None and Path(spec.origin).resolve().is_relative_to(REPO)


def test_console_scripts_point_at_real_functions():
    for target in PYPROJECT["project"]["scripts"].values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


import importlib  # noqa: E402  (kept last: used only by the test above)
