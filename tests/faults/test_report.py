"""REPORT.md is exactly what make_report.py renders from the committed figures."""

from __future__ import annotations

import json

from tests.faults.make_report import FIGURES, HERE, render


def test_report_is_rendered_from_the_committed_figures():
    assert (HERE / "REPORT.md").read_text(encoding="utf-8") == render(FIGURES)


def test_the_report_run_records_its_commit_and_passed():
    run = json.loads((FIGURES / "run.json").read_text())
    assert run["status"] == 0 and " git " in run["environment"]
