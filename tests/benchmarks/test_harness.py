"""The shared benchmark harness: warm-up excluded, medians, ratios, well-formed outputs."""

from __future__ import annotations

import json

import pytest

from benchmarks import harness
from benchmarks.__main__ import SUITES


def test_measure_excludes_warmup_and_counts_repeats():
    calls = []

    def run():
        calls.append(1)
        return None

    m = harness.measure("work", run, items=100, warmup=2, repeats=3, progress=None)
    assert len(calls) == 5
    assert len(m.seconds) == 3
    assert all(r > 0 for r in m.rates)


def test_measure_uses_the_work_actually_done():
    # A run that did half the nominal work must report half the rate it would
    # otherwise claim: ragged last batches are counted honestly.
    m = harness.measure("half", lambda: 50, items=100, warmup=0, repeats=1, progress=None)
    full = harness.Measurement(name="x", unit="img/s", items=100, seconds=[m.seconds[0] / 2])
    assert m.rates[0] == pytest.approx(full.rates[0] / 2, rel=1e-6)


def test_a_run_that_did_no_work_is_an_error_not_a_result():
    with pytest.raises(harness.BenchmarkError, match="run 2 did 0 items"):
        counts = iter([10, 0])
        harness.measure("empty", lambda: next(counts), items=10, warmup=0, repeats=2, progress=None)
    with pytest.raises(harness.BenchmarkError, match="warm-up run did 0 items"):
        harness.measure("empty", lambda: 0, items=10, warmup=1, repeats=1, progress=None)
    with pytest.raises(harness.BenchmarkError, match="0 items of work per run"):
        harness.measure("nothing", lambda: None, items=0, warmup=0, repeats=1, progress=None)


def test_results_record_the_commit_and_whether_the_tree_was_dirty():
    env = harness.environment()
    assert env["git_sha"] != "" and env["git_dirty"] in (True, False, None)


def test_ratios_against_named_baseline():
    base = harness.Measurement(name="torch", unit="img/s", items=100, seconds=[1.0, 2.0, 1.0])
    fast = harness.Measurement(
        name="dali", unit="img/s", items=100, seconds=[0.5, 0.5, 0.25], baseline="torch"
    )
    assert base.median == 100
    assert fast.median == 200
    assert harness.ratios([base, fast]) == {"dali": 2.0}
    table = harness.markdown_table([base, fast])
    assert "2.00x torch" in table and "| torch |" in table


def test_write_results_outputs_are_well_formed(tmp_path):
    base = harness.Measurement(name="a", unit="img/s", items=10, seconds=[1.0])
    other = harness.Measurement(name="b", unit="img/s", items=10, seconds=[0.5], baseline="a")
    paths = harness.write_results("unit", [base, other], tmp_path, notes={"why": "test"})
    data = json.loads(paths["json"].read_text())
    assert data["suite"] == "unit"
    assert data["ratios"] == {"b": 2.0}
    assert {"torch", "nvidia.dali", "webdataset"} <= set(data["environment"]["versions"])
    assert data["environment"]["cpu_count"] >= 1
    assert "| b |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["json"].name.startswith("unit_")


@pytest.mark.parametrize(
    ("argv", "own", "absent"),
    [
        (["gpu", "--help"], "--dry-run", None),
        (["shard-write", "-h"], "--work-dir", "--dry-run"),
        # every suite is offered by name, whichever suites exist
        (["--help"], "{" + ",".join([*SUITES, "all"]) + "}", "--dry-run"),
    ],
)
def test_suite_help_lists_its_own_and_the_common_options(capsys, argv, own, absent):
    from benchmarks.__main__ import main

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert own in out and "--quick" in out and "--repeats" in out
    assert absent is None or absent not in out


def test_missing_suite_is_a_usage_error(capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "required: suite" in capsys.readouterr().err
