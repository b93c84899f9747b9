"""The augmentation study: what each of the article's augmentations does on CIFAR-10.

    python train/experiments/augmentation.py WORK_DIR [--models seed_cnn,cifar_fast_s]
        [--seeds 0,1] [--epochs seed_cnn=10,cifar_fast_s=5] [--rows ROW,...]

Every row trains each model from scratch with the same optimiser (the recipe
``train/recipes/cifar_seed_cnn.toml``: SGD + Nesterov, weight decay, one-cycle),
the same number of epochs for that model and the same seeds; only the
augmentation differs. Test top-1 of the last epoch on the 10,000 test images.
The rows and budgets were fixed before any test accuracy was seen (there is no
model selection on the test set: nothing is tuned). The 10% rows train on 500
images per class (packed with ``--fraction 0.1``), where augmentation should
matter most. Runs that finished are kept and skipped, so the study resumes.
Writes WORK_DIR/results.json (every run's summary) and prints the table;
``--readme train/README.md`` also renders it there between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "train" / "recipes" / "cifar_seed_cnn.toml"
NO_CROP = ["--recipe", "small", "--pad-px", "0"]
PAD_CROP = ["--recipe", "small", "--pad-px", "4", "--hflip", "0.5"]
ROWS: dict[str, tuple[str, list[str], str]] = {  # name -> (what it is, trainer flags, training set)
    "none": ("no augmentation", [*NO_CROP, "--hflip", "0"], "train"),
    "hflip": ("horizontal flip", [*NO_CROP, "--hflip", "0.5"], "train"),
    "hvflip": ("horizontal + vertical flip (the article's)", [*NO_CROP, "--hflip", "0.5", "--vflip", "0.5"], "train"),
    "padcrop": ("pad 4 + random crop + horizontal flip", PAD_CROP, "train"),
    "rotate": ("pad + crop + flip + rotation +-15 deg", [*PAD_CROP, "--rotate-deg", "15"], "train"),
    "translate": ("pad + crop + flip + translation +-0.1", [*PAD_CROP, "--translate", "0.1"], "train"),
    "rrc": ("random-resized-crop scale (0.35, 1) + flip", ["--recipe", "imagenet", "--scale", "0.35,1", "--hflip", "0.5"], "train"),
    "colour": ("pad + crop + flip + colour jitter 0.4", [*PAD_CROP, "--brightness", "0.4", "--contrast", "0.4", "--saturation", "0.4"], "train"),
    "none10": ("10% of the training set, no augmentation", [*NO_CROP, "--hflip", "0"], "train10"),
    "padcrop10": ("10% of the training set, pad + crop + flip", PAD_CROP, "train10"),
}  # fmt: skip
BASELINE = {"train": "none", "train10": "none10"}
DEFAULT_EPOCHS = {"seed_cnn": 10, "cifar_fast_s": 5}
MARK_BEGIN, MARK_END = "<!-- augmentation-study -->", "<!-- /augmentation-study -->"


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prepare(work: Path, archive: Path) -> dict[str, Path]:
    """CIFAR-10 extracted and packed once: shuffled training shards, their 10% subset, test."""
    cifar = work / "cifar"
    if not (cifar / "train").is_dir():
        cifar.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tf:
            tf.extractall(cifar, filter="data")
    root = next(p for p in [cifar, *cifar.iterdir()] if (p / "train").is_dir())
    data = {
        "train": work / "data" / "train",
        "train10": work / "data" / "train10",
        "test": work / "data" / "test",
    }
    packs = {
        "train": ["--shuffle", "--seed", "0"],
        "train10": ["--fraction", "0.1", "--shuffle", "--seed", "0"],
        "test": [],
    }
    for name, flags in packs.items():
        if not (data[name] / "manifest.json").exists():
            split = "test" if name == "test" else "train"
            subprocess.run([_tool("shard"), "pack", str(root / split), str(data[name]), "--workers", "2",
                            "--max-count", "5000", *flags], check=True)  # fmt: skip
    return data


def run_dir(work: Path, row: str, model: str, seed: int) -> Path:
    return work / "runs" / row / model / f"seed{seed}"


def train(work: Path, data: dict[str, Path], row: str, model: str, seed: int, epochs: int) -> dict:
    out = run_dir(work, row, model, seed)
    summary = _summary(out)
    if summary is not None:
        return summary
    _, flags, train_set = ROWS[row]
    cmd = [sys.executable, "-m", "train", "--config", str(RECIPE), "--model", model,
           "--data", str(data[train_set]), "--val-data", str(data["test"]), "--out", str(out),
           "--seed", str(seed), "--epochs", str(epochs), "--eval-every-epochs", "0",
           "--backend", "dali-cpu", "--dali-threads", "2", "--keep-checkpoints", "1",
           "--log-every-steps", "1000", *flags]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    summary = _summary(out)
    summary["wall_s"] = round(time.perf_counter() - t, 1)
    # Paths relative to the work dir: the summaries are committed and must not name this machine.
    summary["data"] = json.loads(json.dumps(summary["data"]).replace(str(work), "WORK"))
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _summary(out: Path) -> dict | None:
    done = out / "study.json"
    if done.exists():
        return json.loads(done.read_text())
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    summary = next((r for r in rows if r["event"] == "summary"), None)
    if summary is None:
        return None
    config = json.loads((out / "config.json").read_text())
    return {"top1": summary["top1"], "step": summary["step"], "epoch": summary["epoch"],
            "train_img_per_s": round(summary["train_img_per_s"], 1), "data": config["data"]}  # fmt: skip


def table(results: dict, models: list[str], seeds: list[int], epochs: dict[str, int]) -> str:
    head = (
        "| row | "
        + " | ".join(
            f"{m} ({epochs[m]} epochs): top-1 % (seeds {', '.join(map(str, seeds))}) | vs no aug."
            for m in models
        )
        + " |"
    )
    lines = [head, "| --- |" + " ---: | ---: |" * len(models)]
    for row, (what, _, train_set) in ROWS.items():
        cells = []
        for m in models:
            runs = [results.get(f"{row}/{m}/seed{s}") for s in seeds]
            if any(r is None for r in runs):
                cells += ["-", "-"]
                continue
            tops = [100 * r["top1"] for r in runs]
            mean = statistics.mean(tops)
            base = [results.get(f"{BASELINE[train_set]}/{m}/seed{s}") for s in seeds]
            delta = "-" if row == BASELINE[train_set] or any(b is None for b in base) else (
                f"{mean - statistics.mean(100 * b['top1'] for b in base):+.2f}")  # fmt: skip
            cells += [f"{mean:.2f} ({', '.join(f'{t:.2f}' for t in tops)})", delta]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_readme(readme: Path, text: str, command: str) -> None:
    body = readme.read_text()
    block = f"{MARK_BEGIN}\n{text}\nReproduce: `{command}`\n{MARK_END}"
    if MARK_BEGIN in body:
        a = body.index(MARK_BEGIN)
        b = body.index(MARK_END) + len(MARK_END)
        body = body[:a] + block + body[b:]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    readme.write_text(body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("work", type=Path)
    p.add_argument("--models", default="seed_cnn,cifar_fast_s")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", default=",".join(f"{k}={v}" for k, v in DEFAULT_EPOCHS.items()),
                   help="MODEL=EPOCHS,... (default: %(default)s)")  # fmt: skip
    p.add_argument("--rows", default=",".join(ROWS), help="rows to run (default: all)")
    p.add_argument(
        "--archive", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    )
    p.add_argument("--readme", type=Path, help="render the table into this README's markers")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: the table of the runs in WORK_DIR/results.json so far")  # fmt: skip
    args = p.parse_args(argv)
    models = args.models.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs = {
        **DEFAULT_EPOCHS,
        **{k: int(v) for k, v in (kv.split("=") for kv in args.epochs.split(","))},
    }
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    data = {} if args.table_only else prepare(args.work, args.archive)
    for row in [] if args.table_only else rows:
        for model in models:
            for seed in seeds:
                results[f"{row}/{model}/seed{seed}"] = train(
                    args.work, data, row, model, seed, epochs[model]
                )
                results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    text = table(results, models, seeds, epochs)
    print(text)
    if args.readme:
        command = f"python train/experiments/augmentation.py WORK --models {args.models} --seeds {args.seeds} --epochs {args.epochs}"
        render_readme(args.readme, text, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
