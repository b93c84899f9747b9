"""A real 2-process torchrun (gloo, CPU) job iterates an epoch on both ranks without hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline.test_loader import all_keys

SCRIPT = Path(__file__).with_name("torchrun_epoch.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali-cpu", marks=pytest.mark.dali)])
def test_two_ranks_iterate_an_epoch(small_ds, tmp_path, backend):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--standalone", str(SCRIPT), small_ds, str(tmp_path), backend,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in results] == [9, 9]  # ceil(120 / (2 * 7))
    assert all(r["min"] == r["max"] == 9 == r["len"] for r in results)
    keys = [k for r in results for k in r["keys"]]
    assert set(keys) == all_keys(small_ds)
    assert len(keys) - len(set(keys)) == sum(r["repeated"] for r in results) == 6
