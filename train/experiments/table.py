"""Summarise an article_techniques.sh work dir as a Markdown table (stdout)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean


def top1(run: Path) -> float | None:
    """Final test top-1 (percent) of a finished run, None when it is missing."""
    try:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    except OSError:
        return None
    evals = [r for r in rows if r.get("event") == "eval"]
    return 100 * evals[-1]["top1"] if evals else None


def fmt_mean(runs: list[Path]) -> str:
    vals = [v for v in map(top1, runs) if v is not None]
    if not vals:
        return "n/a"
    each = ", ".join(f"{v:.1f}" for v in vals)
    return f"{mean(vals):.2f} ({each})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--seeds", nargs="+", default=["0", "1"])
    a = p.parse_args()
    w = Path(a.work)
    r = w / "runs"
    out = ["| experiment | variant | test top-1 % (mean of seeds; each) |", "|---|---|---|"]
    for v in ("scratch", "features", "finetune", "finetune1x"):
        runs = [r / f"tl-{v}-s{s}" for s in a.seeds]
        out.append(f"| transfer, classes 5-9 at 10% | {v} | {fmt_mean(runs)} |")
    out.append(f"| distillation | teacher | {fmt_mean([r / 'teacher'])} |")
    for v, label in (("none", "seed_cnn alone"), ("teacher", "seed_cnn + teacher")):
        out.append(
            f"| distillation | {label} | {fmt_mean([r / f'kd-{v}-s{s}' for s in a.seeds])} |"
        )
    out.append(f"| pruning | teacher dense | {fmt_mean([r / 'teacher'])} |")
    out.append(f"| pruning | teacher 50% global + fine-tune | {fmt_mean([r / 'prune-gm50-ft'])} |")
    out.append(
        f"| pruning | seed_cnn dense (seed {a.seeds[0]}) | {fmt_mean([r / f'kd-none-s{a.seeds[0]}'])} |"
    )
    out.append(
        f"| pruning | seed_cnn 30% channels + fine-tune | {fmt_mean([r / 'prune-ch30-ft'])} |"
    )
    out += ["", "| pruned model | params | non-zeros | MACs | CPU img/s |", "|---|---|---|---|---|"]
    for name, label in (
        ("prune-gm50.json", "teacher 50% global"),
        ("prune-ch30.json", "seed_cnn 30% channels"),
    ):
        try:
            s = json.loads((w / name).read_text())
        except (OSError, ValueError):
            continue
        b, af = s["before"], s["after"]
        cells = [f"{b[k]:,} -> {af[k]:,}" for k in ("params", "nonzero", "macs", "cpu_img_per_s")]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
