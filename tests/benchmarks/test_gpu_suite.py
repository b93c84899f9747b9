"""The GPU suite's one command, exercised on the CPU: `gpu_suite.sh --dry-run`.

The real run needs a GPU and DALI; the dry run goes through the same flow
(pack, feed ratios, decode with every hw_decoder_load, CIFAR-10 to target)
with tiny sizes, so a broken step shows up here. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_results_check import check_results

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.dali
def test_dry_run_measures_every_part_and_prints_the_summary_last(tmp_path):
    # Relative --out and --work-dir are taken from the caller's folder, not the repo's.
    proc = _run("--dry-run", "--out", "out", "--work-dir", "work", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = check_results(tmp_path / "out", "gpu")
    names = [r["name"] for r in payload["results"]]
    expected = ["loader/dali-cpu", "loader/wds-dataloader", "loader/dali-cpu-files"]
    for model in ("resnet50", "resnet18"):
        expected += [f"train/synthetic/{model}", f"train/dali-cpu/{model}",
                     f"train/wds-dataloader/{model}"]  # fmt: skip
    expected.append("train/dali-cpu-files/resnet18")
    expected += [f"decode/cpu/hw_decoder_load={x}" for x in ("0", "0.65", "0.9")]
    expected += ["cifar10/cifar_fast/time-to-94%"]
    assert names == expected
    # Feed ratios: fed training against the synthetic ceiling of the same model.
    by = {r["name"]: r for r in payload["results"]}
    for model in ("resnet50", "resnet18"):
        for feed in ("dali-cpu", "wds-dataloader"):
            assert by[f"train/{feed}/{model}"]["baseline"] == f"train/synthetic/{model}"
            assert payload["notes"][f"bottleneck train/{feed}/{model}"].split(":")[0] in (
                "data feed",
                "compute",
            )
    cifar = by["cifar10/cifar_fast/time-to-94%"]["params"]
    assert 0.0 <= cifar["top1"] <= 1.0 and cifar["epochs"] == 1 and cifar["reached"] is False
    assert payload["notes"]["mode"].startswith("DRY RUN")

    # The summary table comes last on stdout and is appended to the Markdown file.
    tail = proc.stdout.rstrip().split("### GPU suite summary")[-1]
    assert "| train/dali-cpu/resnet50 |" in tail and "feed ratio" in tail
    assert "wrote " not in tail
    md = next((tmp_path / "out").glob("gpu_*.md")).read_text()
    assert "### GPU suite summary" in md and "time-to-94%" in md
    assert json.loads(next((tmp_path / "out").glob("gpu_*.json")).read_text())["ratios"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_real_run_without_a_gpu_stops_in_one_line(tmp_path):
    proc = _run("--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu: cannot run, missing: a CUDA GPU")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--wheels", "/nonexistent-wheels"], "--wheels /nonexistent-wheels is not a folder"),
        (["--data", "/nonexistent-data"], "--data /nonexistent-data is not a folder"),
        (["--wheels"], "--wheels needs a folder"),
    ],
)
def test_wrapper_refuses_bad_arguments_in_one_line(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gpu_suite: {message}"


def test_wrapper_refuses_a_wheel_folder_without_wheels(tmp_path):
    (tmp_path / "notes.txt").write_text("no wheels here")
    proc = _run("--wheels", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gpu_suite: no wheels (*.whl or part-*) in {tmp_path}"
