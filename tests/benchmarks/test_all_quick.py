"""`python -m benchmarks all --quick` as CI runs it: a real subprocess, results well-formed.

No timing is asserted: only that every suite wrote its JSON (environment,
raw seconds, medians, ratios where a baseline is named), its Markdown table
and valid PNG plots, and that the end-to-end report names the bottleneck.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_results_check import check_results, is_png

REPO = Path(__file__).resolve().parents[2]
SUITES = ("shard-write", "pipeline", "train", "e2e", "scale", "feed")


@pytest.mark.slow
@pytest.mark.dali
def test_all_quick_writes_well_formed_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for suite in SUITES:
        assert f"== {suite} (quick)" in proc.stdout
        check_results(out, suite)

    # The end-to-end report names the limiting stage for every fed configuration.
    e2e = json.loads(next(out.glob("e2e_*.json")).read_text())
    fed = [r["name"] for r in e2e["results"] if r["name"].startswith("train/")]
    fed = [n for n in fed if "wds-dataloader" not in n]
    assert fed
    e2e_md = next(out.glob("e2e_*.md")).read_text()
    for name in fed:
        backend, tag = name.split("/", 2)[1], name.split("/", 2)[2]
        line = next(
            x for x in e2e_md.splitlines() if x.startswith(f"- bottleneck {backend}/{tag}:")
        )
        assert ("data feed" in line) or ("compute" in line)
    # ... and plots img/s over time for those runs.
    (trace,) = out.glob("e2e_*_img_per_s_over_time.png")
    assert is_png(trace)

    # Every suite measured its own baselines in the same run.
    names = {
        suite: {
            r["name"] for r in json.loads(next(out.glob(f"{suite}_*.json")).read_text())["results"]
        }
        for suite in SUITES
    }
    assert any("wds-shardwriter" in n for n in names["shard-write"])
    assert any(n.startswith("wds-dataloader/") for n in names["pipeline"])
    assert any(n.startswith("synthetic/") for n in names["pipeline"])
    assert any(n.startswith("train/wds-dataloader/") for n in names["e2e"])
