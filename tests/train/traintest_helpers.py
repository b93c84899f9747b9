"""Helpers for the trainer tests (imported by name: tests are not a package)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return e


def run_train(
    args: list[str],
    *,
    torchrun: list[str] | None = None,
    timeout: float = 300,
    module: str = "train",
    **kw,
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS``, or under ``torch.distributed.run TORCHRUN`` when given."""
    cmd = [sys.executable]
    if torchrun is not None:
        cmd += ["-m", "torch.distributed.run", *torchrun]
    cmd += ["-m", module, *map(str, args)]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=kw.pop("env", None) or env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["event"] == kind]


def audit_steps(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """step -> keys of RANK, the LAST occurrence of each step (a resumed run replays some)."""
    out: dict[int, list[str]] = {}
    for line in (run_dir / "audit" / f"keys-rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["keys"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    return torch.load(ckpts[-1], weights_only=True)["model"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
