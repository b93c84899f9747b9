"""A run directory on object storage (a real SeaweedFS S3 server): checkpoints, resume, metrics."""

from __future__ import annotations

import json

import fsspec
import pytest
from traintest_helpers import check, env, run_train

pytestmark = pytest.mark.s3


def test_s3_run_dir_checkpoints_and_resumes(tiny_train, s3_env, s3_prefix):
    out = f"{s3_prefix}/run"
    args = ["--data", tiny_train, "--backend", "torch", "--num-workers", "0", "--out", out,
            "--batch-size", "20", "--epochs", "2", "--ckpt-every-steps", "3", "--keep-checkpoints", "2",
            "--log-every-steps", "1"]  # fmt: skip
    killed = run_train(args, env=env(SHARDFLOW_FAULT_KILL="0:7", **s3_env))
    assert killed.returncode == -9
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/checkpoints", detail=False))
    assert names == [
        "step-000000005.pt",
        "step-000000006.pt",
    ]  # pruned to 2, no partial left visible
    proc = check(
        run_train([*args, "--resume", "auto"], env=env(TORCHELASTIC_RESTART_COUNT="1", **s3_env))
    )
    assert f"resumed from {out}/checkpoints/step-000000006.pt" in proc.stdout
    assert "train: done: 10 steps" in proc.stdout
    rows = [json.loads(x) for x in fs.cat(f"{out}/metrics.jsonl").decode().splitlines()]
    assert rows[-1]["event"] == "summary" and rows[-1]["step"] == 10
    # The killed attempt's history is kept, up to its last checkpoint (step 6; step 7's
    # line was not yet flushed when it died), then the resumed attempt's.
    assert [r["event"] for r in rows].count("start") == 2
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, 11))
    assert [r["step"] for r in rows if r["event"] == "checkpoint"] == [3, 5, 6, 9, 10]
    assert json.loads(fs.cat(f"{out}/config.json"))["run"]["out"] == out
    fs.invalidate_cache()  # the listing above is cached; the second process has written since
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/checkpoints", detail=False))
    assert names == ["step-000000009.pt", "step-000000010.pt"]
