"""benchmarks/train_step.py (suite `train`) runs and reports ratios to its baseline."""

from __future__ import annotations


def test_train_step_benchmark_suite_runs(tmp_path):
    from benchmarks.__main__ import main

    args = [
        "train",
        "--quick",
        "--models",
        "seed_cnn",
        "--steps",
        "1",
        "--out",
        str(tmp_path),
        "--no-plot",
    ]
    assert main(args) == 0
    md = next(tmp_path.glob("train_*.md")).read_text()
    assert "seed_cnn/32px/b64/fp32-channels_last" in md and "x seed_cnn/32px/b64/fp32-nchw" in md
