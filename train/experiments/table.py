"""Summarise an article_techniques.sh work dir as Markdown tables (stdout).

Each row names its model and budget (read from the run's config.json, so a
reduced run is labelled as what it was), the mean over seeds with each seed's
value, and the difference to the row it is compared with, beside the target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean


def _rows(run: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    except OSError:
        return []


def top1(run: Path) -> float | None:
    """Final test top-1 (percent) of a finished run, None when it is missing."""
    evals = [r for r in _rows(run) if r.get("event") == "eval"]
    return 100 * evals[-1]["top1"] if evals else None


def budget(runs: list[Path]) -> str:
    """'model, E epochs, N steps' of the first run that has a config and a summary."""
    for run in runs:
        try:
            cfg = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        steps = [r.get("step") for r in _rows(run) if r.get("event") == "summary"]
        text = f"{cfg['model']['model']}, {cfg['run']['epochs']} ep"
        if cfg["model"].get("init_from") and cfg["model"].get("head_lr_mult", 1) != 1:
            text += f", classifier lr x{cfg['model']['head_lr_mult']:g}"
        if cfg["optim"].get("teacher"):
            # .../runs/NAME/checkpoints/step-N.pt: name the teacher run and its accuracy.
            t_run = Path(cfg["optim"]["teacher"]).parents[1]
            t_top1 = top1(t_run)
            text += f", teacher '{t_run.name}'" + (f" {t_top1:.1f}%" if t_top1 else "")
            text += f", alpha {cfg['optim']['kd_alpha']:g}, T {cfg['optim']['kd_temperature']:g}"
        return text + (f", {steps[-1]} steps" if steps and steps[-1] else "")
    return "n/a"


def values(runs: list[Path]) -> list[float]:
    return [v for v in map(top1, runs) if v is not None]


def cell(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    return f"{mean(vals):.2f} ({', '.join(f'{v:.1f}' for v in vals)})"


def delta(vals: list[float], base: list[float]) -> str:
    return f"{mean(vals) - mean(base):+.2f}" if vals and base else "n/a"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--seeds", nargs="+", default=["0", "1"])
    a = p.parse_args()
    w = Path(a.work)
    r = w / "runs"
    seeds = a.seeds

    def runs(prefix: str) -> list[Path]:
        return [r / f"{prefix}-s{s}" for s in seeds]

    out: list[str] = []
    models = sorted({d.name.split("-")[1] for d in r.glob("tl-*-scratch-s*") if d.is_dir()})
    for m in models:

        def tl(v: str, m: str = m) -> list[Path]:
            return runs(f"tl-{m}-{v}")

        scratch = values(tl("scratch"))
        out += [
            f"Transfer with {m}: pretrained on classes 0-4 ({budget([r / f'pretrain-{m}'])}, "
            "all their training images).",
            "",
            "| classes 5-9, 10% of their training images | budget | "
            "test top-1 % (mean; each seed) | vs scratch | target |",
            "|---|---|---|---|---|",
        ]
        for v, label, target in (
            ("scratch", "from scratch", ""),
            ("features", "features (frozen backbone, classifier trained)", ">= +5"),
            ("finetune", "finetune, backbone lr x0.1", ">= +5"),
            ("finetune1x", "finetune, backbone lr x1", ""),
        ):
            vals = values(tl(v))
            d = "" if v == "scratch" else delta(vals, scratch)
            out.append(f"| {label} | {budget(tl(v))} | {cell(vals)} | {d} | {target} |")
        out.append("")

    teacher = values([r / "teacher"])
    none = values(runs("kd-none"))
    out += [
        "| distillation: CIFAR-10, all classes | budget | test top-1 % (mean; each seed) "
        "| vs no teacher | target |",
        "|---|---|---|---|---|",
        f"| teacher | {budget([r / 'teacher'])} | {cell(teacher)} | | |",
    ]
    long_teacher = r / "teacher-long"
    if long_teacher.is_dir():
        out.append(
            f"| teacher-long | {budget([long_teacher])} | {cell(values([long_teacher]))} | | |"
        )
    out.append(f"| seed_cnn alone | {budget(runs('kd-none'))} | {cell(none)} | | |")
    # kd-teacher-s<seed> (the script's setting) and any kd-teacher-<variant>-s<seed>.
    variants = sorted({d.name.rsplit("-s", 1)[0] for d in r.glob("kd-teacher*-s*") if d.is_dir()})
    for prefix in variants:
        kd = values(runs(prefix))
        out.append(
            f"| seed_cnn + teacher | {budget(runs(prefix))} | {cell(kd)} "
            f"| {delta(kd, none)} | >= +1 |"
        )

    gm = values([r / "prune-gm50-ft"])
    dense_s = values([r / f"kd-none-s{seeds[0]}"])
    ch = values([r / "prune-ch30-ft"])
    tch = values([r / "prune-teacher-ch30-ft"])
    out += [
        "",
        "| pruning | fine-tune budget | test top-1 % | vs dense | target |",
        "|---|---|---|---|---|",
        f"| teacher, dense | | {cell(teacher)} | | |",
        f"| teacher, 50% global magnitude + fine-tune (masks kept) "
        f"| {budget([r / 'prune-gm50-ft'])} | {cell(gm)} | {delta(gm, teacher)} | >= -1 |",
        f"| teacher, 30% of channels removed + fine-tune "
        f"| {budget([r / 'prune-teacher-ch30-ft'])} | {cell(tch)} | {delta(tch, teacher)} "
        "| >= -2 |",
        f"| seed_cnn (seed {seeds[0]}), dense | | {cell(dense_s)} | | |",
        f"| seed_cnn, 30% of channels removed + fine-tune "
        f"| {budget([r / 'prune-ch30-ft'])} | {cell(ch)} | {delta(ch, dense_s)} | >= -2 |",
        "",
        "| pruned model | params | non-zeros | MACs | CPU inference img/s |",
        "|---|---|---|---|---|",
    ]
    for name, label in (
        ("prune-gm50.json", "teacher 50% global"),
        ("prune-teacher-ch30.json", "teacher 30% channels"),
        ("prune-ch30.json", "seed_cnn 30% channels"),
    ):
        try:
            s = json.loads((w / name).read_text())
        except (OSError, ValueError):
            continue
        b, af = s["before"], s["after"]
        cells = [f"{b[k]:,} -> {af[k]:,}" for k in ("params", "nonzero", "macs")]
        speed = f"{b['cpu_img_per_s']:,.0f} -> {af['cpu_img_per_s']:,.0f}"
        bench = s.get("bench") or {}
        if bench:
            speed += (
                f" = x{bench['speedup']:.2f} (median of {bench['repeats']}, batch "
                f"{bench['batch']}, {bench['threads']} threads)"
            )
        out.append(f"| {label} | " + " | ".join([*cells, speed]) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
