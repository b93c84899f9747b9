"""The install and test commands fail loudly: a pip error or a missing DALI is red, never skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bootstrap_stops_on_a_pip_failure(tmp_path):
    """A project whose dependency cannot be installed: bootstrap exits non-zero and says so."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "bootstrap.sh", tmp_path / "scripts" / "bootstrap.sh")
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "unreachable-demo"\nversion = "0"\n'
        'dependencies = ["shardflow-test-no-such-distribution==0.0.1"]\n'
    )
    env = {**os.environ, "PIP_NO_INDEX": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "scripts/bootstrap.sh", "dev"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "bootstrap: 'pip install -e .[dev]' failed" in proc.stderr
    assert "ERROR: " in proc.stderr  # pip's own words are shown


def test_a_missing_dali_fails_the_test_command(tmp_path):
    """With SHARDFLOW_REQUIRE_DALI=1 (the test command sets it), DALI tests are not skipped
    when DALI does not import: the run stops with the reason."""
    shadow = tmp_path / "shadow" / "nvidia"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")  # a plain `nvidia` package without `dali`
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/pipeline/test_loader.py", "-k", "dali-cpu and test_epoch_api"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    env.pop("SHARDFLOW_REQUIRE_DALI", None)
    skipped = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    env["SHARDFLOW_REQUIRE_DALI"] = "1"
    failed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0
    assert "NVIDIA DALI does not import" in failed.stdout + failed.stderr
