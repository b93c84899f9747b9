"""README's performance tables, rendered from the committed result files they cite.

    python -m benchmarks.readme            # rewrite the blocks in README.md
    python -m benchmarks.readme --check    # exit 1 if README.md differs (a test runs this)

A block in README.md is

    <!-- figures: SUITE benchmarks/results/FILE.json -->
    ...rendered from FILE.json...
    <!-- /figures -->

and nothing between the markers is written by hand: every figure the README's
Performance section quotes comes from the result file named in the block's
first line, so it cannot drift from the measurement.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(<!-- figures: (?P<suite>[\w-]+) (?P<path>\S+\.json) -->\n)(?P<body>.*?)(<!-- /figures -->)",
    re.S,
)
DATASETS = {"cifar10": "CIFAR-10 train", "imagenet500": "ImageNet sample", "cifar": "CIFAR-10",
            "imagenet": "ImageNet sample"}  # fmt: skip


class Result:
    """One result file: medians by name, notes, environment."""

    def __init__(self, path: Path) -> None:
        self.path = path
        payload = json.loads(path.read_text())
        self.env: dict[str, Any] = payload["environment"]
        self.notes: dict[str, Any] = payload.get("notes") or {}
        self.rows: dict[str, dict[str, Any]] = {r["name"]: r for r in payload["results"]}

    def median(self, name: str) -> float:
        return float(self.rows[name]["median"])

    def repeats(self, name: str) -> int:
        return len(self.rows[name]["seconds"])

    def params(self, name: str) -> dict[str, Any]:
        return self.rows[name].get("params") or {}

    def provenance(self) -> str:
        env = self.env
        dirty = " with uncommitted changes" if env.get("git_dirty") else ""
        return (
            f"{env['date'][:10]}, {env['cpu_model']} ({env['cpu_count']} cores), "
            f"torch {env['versions']['torch']}, DALI {env['versions']['nvidia.dali']}, "
            f"git {env['git_sha']}{dirty}"
        )


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def _vs(result: Result, name: str, base: str, unit: str = "img/s") -> str:
    a, b = result.median(name), result.median(base)
    return f"{_rate(a)} vs {_rate(b)} {unit} = **{a / b:.2f}x**"


def render_shard_write(result: Result) -> str:
    names = sorted({n.split("/", 1)[0] for n in result.rows})
    writers = next(n for n in result.rows if "/a2 " in n).split(" ", 1)[1]
    procs = writers.rsplit("-", 1)[1].removesuffix("proc")
    lines = [
        f"Measured {result.provenance()}; load average {result.notes['load_avg_1m_at_start']} "
        f"at start, {result.notes['load_avg_1m_at_end']} at end; median of "
        f"{result.repeats(names[0] + '/b pack-novalidate')} timed runs after a warm-up, each "
        f"including its process start-up; pack uses {procs} worker processes.",
        "",
        f"| dataset | pack --no-validate vs ShardWriter, 1 process | pack --no-validate vs "
        f"ShardWriter, {procs} processes | pack with full-decode validation vs decode-only "
        f"(PIL, {procs} processes) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for ds in names:
        p = result.params(f"{ds}/b pack-novalidate")
        label = (
            f"{DATASETS.get(ds, ds)}, {p.get('images', 0):,} images ({p.get('source_mb', 0):,} MB)"
        )
        b = f"{ds}/b pack-novalidate"
        lines.append(
            f"| {label} | {_vs(result, b, f'{ds}/a wds-shardwriter')} | "
            f"{_vs(result, b, f'{ds}/a2 {writers}')} | "
            f"{_vs(result, f'{ds}/d pack-validate', f'{ds}/c decode-only')} |"
        )
    mb = [
        f"{DATASETS.get(ds, ds)} {_rate(result.median(f'{ds}/b pack-novalidate MB/s'))} MB/s "
        f"(ShardWriter {_rate(result.median(f'{ds}/a wds-shardwriter MB/s'))}, "
        f"{procs} processes {_rate(result.median(f'{ds}/a2 {writers} MB/s'))})"
        for ds in names
    ]
    turbo = [
        f"{DATASETS.get(ds, ds)} "
        f"{result.median(f'{ds}/d pack-validate') / result.median(f'{ds}/c2 decode-only-turbo'):.2f}x"
        for ds in names
    ]
    lines += [
        "",
        f"Written bytes per second, pack --no-validate: {'; '.join(mb)}. Against a decode-only "
        f"loop with pack's own JPEG decoder (libjpeg-turbo), validated packing runs at "
        f"{', '.join(turbo)}: what pack costs beyond decoding.",
    ]
    return "\n".join(lines) + "\n"


def render_pipeline(result: Result) -> str:
    datasets = [d for d in ("imagenet", "cifar") if f"torch/{d}/local" in result.rows]
    cols = [("dali-cpu", "dali-cpu"), ("device-cache", "device cache"),
            ("wds-dataloader", "webdataset + DataLoader (PIL)"),
            ("dali-native-wds", "DALI's own webdataset reader")]  # fmt: skip
    some = datasets[0]
    lines = [
        f"Measured {result.provenance()}; load average (1/5/15 min) "
        f"{result.notes.get('load average at start (1/5/15 min)', '?')} at start, "
        f"{result.notes.get('load average at end (1/5/15 min)', '?')} at end; median of "
        f"{result.repeats(f'torch/{some}/local')} interleaved rounds after a warm-up; "
        f"{result.notes.get('setup', '')}.",
        "",
        "| dataset | torch | " + " | ".join(label for _, label in cols) + " |",
        "| --- | ---: |" + " ---: |" * len(cols),
    ]
    for ds in datasets:
        base = result.median(f"torch/{ds}/local")
        cells = []
        for key, _ in cols:
            name = f"{key}/{ds}/local"
            if name in result.rows:
                cells.append(f"{_rate(result.median(name))} ({result.median(name) / base:.2f}x)")
            else:
                cells.append("-")
        lines.append(f"| {DATASETS[ds]}, local | {_rate(base)} img/s | " + " | ".join(cells) + " |")
    s3 = []
    for ds in datasets:
        parts = [
            f"{key} {result.median(f'{key}/{ds}/s3') / result.median(f'{key}/{ds}/local'):.2f}x"
            for key in ("torch", "dali-cpu", "device-cache")
            if f"{key}/{ds}/s3" in result.rows
        ]
        if parts:
            s3.append(f"{DATASETS[ds]}: {', '.join(parts)}")
    if s3:
        lines += [
            "",
            "Same shards from S3 (SeaweedFS on loopback), against local: " + "; ".join(s3) + ".",
        ]
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[Result], str]] = {
    "shard-write": render_shard_write,
    "pipeline": render_pipeline,
}


def update(text: str, root: Path = REPO) -> str:
    """TEXT with every figures block re-rendered from the file it names."""

    def one(m: re.Match) -> str:
        suite = m.group("suite")
        if suite not in RENDERERS:
            raise ValueError(f"README figures block names unknown suite {suite!r}")
        body = RENDERERS[suite](Result(root / m.group("path")))
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(one, text)


def blocks(text: str) -> list[tuple[str, str]]:
    """(suite, result path) of every figures block in TEXT."""
    return [(m.group("suite"), m.group("path")) for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("readme", nargs="?", default=str(REPO / "README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs")
    args = p.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text()
    new = update(text)
    if args.check:
        if new != text:
            print(f"{path}: figures differ from their result files; run python -m benchmarks.readme",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    path.write_text(new)
    print(f"{path}: {len(blocks(new))} figures blocks rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
