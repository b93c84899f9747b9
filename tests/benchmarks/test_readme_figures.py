"""README's performance figures are the result files' figures, rendered, never typed."""

from __future__ import annotations

import re
import subprocess

from benchmarks.readme import BLOCK, REPO, blocks, update

README = REPO / "README.md"
# A throughput, a ratio or a percentage: what a measurement would be quoted as.
FIGURE = re.compile(r"\d[\d,]*(\.\d+)?\s*(img/s|MB/s|GB/s|x\b|%)")


def _performance_section(text: str) -> str:
    start = text.index("\n## Performance")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_readme_figures_are_rendered_from_their_result_files():
    text = README.read_text()
    cited = blocks(text)
    assert {suite for suite, _ in cited} >= {"shard-write", "pipeline"}
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())  # fmt: skip
    for _, path in cited:
        assert path in tracked, f"{path} is cited by README.md but not committed"
    assert update(text) == text, (
        "README.md differs from its result files: python -m benchmarks.readme"
    )


def test_no_figure_in_the_performance_section_is_typed_by_hand():
    section = BLOCK.sub("", _performance_section(README.read_text()))
    typed = [m.group(0) for m in FIGURE.finditer(section)]
    assert not typed, f"figures outside a rendered block: {typed}"
