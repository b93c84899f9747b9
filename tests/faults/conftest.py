"""Fixtures of the fault-injection suite: every case records its figures for REPORT.md.

A test calls ``figures(section, case, **values)`` once per row it wants in the
report. Rows go to ``$SHARDFLOW_FAULT_FIGURES/<section>.jsonl`` when that
variable is set (``make_report.py`` sets it), and to the test's temporary
folder otherwise, so a plain pytest run never writes into the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FIGURES_ENV = "SHARDFLOW_FAULT_FIGURES"

# The report's sections, in the order REPORT.md shows them.
SECTIONS = {
    "write": "Bad images at write time",
    "read": "Corrupt data at read time",
    "storage": "Object-storage faults",
    "killed": "Killed processes",
    "concurrency": "Concurrency and load",
    "security": "Security",
}


@pytest.fixture
def figures(tmp_path):
    """``figures(section, case, **values)`` appends one row to the report's SECTION table."""
    out = Path(os.environ.get(FIGURES_ENV) or tmp_path / "figures")
    out.mkdir(parents=True, exist_ok=True)

    def record(section: str, case: str, **values) -> None:
        if section not in SECTIONS:
            raise ValueError(f"unknown report section {section!r}; one of {sorted(SECTIONS)}")
        row = {"case": case, **values}
        with open(out / f"{section}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=False, default=str) + "\n")

    return record
