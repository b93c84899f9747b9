"""Stress the end of a multi-rank run: many short torchrun jobs beside a CPU-heavy neighbour.

    python scripts/stress_teardown.py --runs 200 --ranks 2 4 --hog 2 --out stress.json

Each run trains a few steps on a tiny packed dataset with 2 or 4 gloo ranks (DDP,
torch backend) and ends; what is counted is how the ranks end. An abort (a rank
killed by SIGABRT, "Fatal Python error: Aborted", "terminate called ...") or any
other failure is kept with its log under --logs. The neighbour is --hog busy
processes (a pure-Python loop each) for the whole stress. Exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABORT_SIGNS = ("Fatal Python error: Aborted", "terminate called", "SIGABRT", "exitcode  : -6")


def _hog() -> None:
    while True:
        pass


def _dataset(root: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from shard_tools.pack import PackConfig, pack
    from shard_tools.synth import make_image_folder

    src = make_image_folder(root / "src", num_classes=4, per_class=25, size=32, seed=1)
    dest = root / "shards"
    pack(PackConfig(src=str(src), dest=str(dest), max_count=15, workers=1), progress=False)
    return dest


def _one(data: Path, ranks: int, out: Path, timeout_s: float) -> tuple[str, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(ranks), "-m", "train", "--data", str(data),
           "--backend", "torch", "--num-workers", "0", "--out", str(out),
           "--batch-size", "8", "--epochs", "1", "--max-steps", "3", "--dist-timeout-s", "120"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        return "hang", f"timed out after {timeout_s} s\n{exc.stdout or ''}{exc.stderr or ''}"
    log = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "ok", log
    return ("abort" if any(s in log for s in ABORT_SIGNS) else "failed"), log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--runs", type=int, default=200, help="runs per rank count (default: %(default)s)"
    )
    p.add_argument(
        "--ranks", type=int, nargs="+", default=[2, 4], help="rank counts (default: 2 4)"
    )
    p.add_argument(
        "--hog", type=int, default=2, help="busy neighbour processes (default: %(default)s)"
    )
    p.add_argument("--timeout-s", type=float, default=300, help="per run (default: %(default)s)")
    p.add_argument(
        "--out", default="stress-teardown.json", help="summary JSON (default: %(default)s)"
    )
    p.add_argument("--logs", default="stress-teardown-logs", help="logs of failed runs")
    args = p.parse_args(argv)
    from tqdm import tqdm

    sys.path.insert(0, str(REPO))
    from train.metrics import git_dirty, git_sha

    hogs = [mp.Process(target=_hog, daemon=True) for _ in range(args.hog)]
    for h in hogs:
        h.start()
    counts = {r: {"ok": 0, "abort": 0, "failed": 0, "hang": 0} for r in args.ranks}
    logs = Path(args.logs)
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="stress-teardown-") as tmp:
            data = _dataset(Path(tmp))
            total = args.runs * len(args.ranks)
            with tqdm(total=total, unit="run", file=sys.stderr) as bar:
                for i in range(args.runs):
                    for ranks in args.ranks:  # interleaved: both see the same load over time
                        out = Path(tmp) / f"run-{ranks}-{i}"
                        outcome, log = _one(data, ranks, out, args.timeout_s)
                        counts[ranks][outcome] += 1
                        if outcome != "ok":
                            logs.mkdir(parents=True, exist_ok=True)
                            (logs / f"{outcome}-{ranks}ranks-{i}.log").write_text(log)
                            tqdm.write(f"run {i} with {ranks} ranks: {outcome} (log in {logs})")
                        subprocess.run(["rm", "-rf", str(out)], check=False)
                        bad = sum(
                            c[k] for c in counts.values() for k in ("abort", "failed", "hang")
                        )
                        bar.set_postfix_str(f"not ok {bad}")
                        bar.update(1)
    finally:
        for h in hogs:
            h.terminate()
    summary = {
        "runs_per_rank_count": args.runs,
        "outcomes": {f"{r} ranks": c for r, c in counts.items()},
        "hog_processes": args.hog,
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.monotonic() - t0, 1),
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
    }
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    failed = any(c[k] for c in counts.values() for k in ("abort", "failed", "hang"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
