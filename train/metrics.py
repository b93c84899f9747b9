"""What a run reports: RUN_DIR/metrics.jsonl (rank 0), console lines, environment header."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

import fsspec
import torch

from shard_tools.format import redact


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_sha() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit git_sha names (None: not a git checkout).

    A figure measured on a dirty tree does not belong to that commit alone.
    """
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _version(dist_prefix: str) -> str | None:
    """Installed version of the first distribution named DIST_PREFIX*, without importing it
    (importing DALI or torchvision only to read a version costs seconds at start-up)."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == dist_prefix or name.startswith(dist_prefix + "-"):
            return dist.version
    return None


def environment(device: torch.device, world_size: int, backend: str) -> dict[str, Any]:
    """Versions, devices and code revision: enough to reproduce or compare a run."""
    env: dict[str, Any] = {
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dali": _version("nvidia-dali"),
        "device": str(device),
        "world_size": world_size,
        "dist_backend": backend,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on a GPU; peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """Rank 0 appends one JSON object per event to RUN_DIR/metrics.jsonl and prints a
    readable line; other ranks stay silent. Object stores cannot append: a remote file
    is read once at start (the history of earlier attempts of the run, kept) and
    rewritten whole, history first, on every flush."""

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.url = run_dir.rstrip("/") + "/metrics.jsonl"
        self.local = "://" not in run_dir or run_dir.startswith("file://")
        self.lines: list[str] = []
        self._history = ""
        if enabled and not self.local:
            try:
                with fsspec.open(self.url, "r") as f:
                    self._history = f.read()
            except FileNotFoundError:
                pass
            if self._history and not self._history.endswith("\n"):
                self._history += "\n"  # a torn last line stays a line of its own
        self.t0 = time.perf_counter()
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "--tensorboard needs the tensorboard package (pip install tensorboard)"
                ) from None
            self.tb = SummaryWriter(run_dir.rstrip("/") + "/tb")
        if enabled and self.local:
            fs, path = fsspec.core.url_to_fs(self.url)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self._file = open(path, "a")  # noqa: SIM115 - kept open for the run, closed in close()

    def event(self, kind: str, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        # Records and lines may quote a dataset URL: never with its credentials.
        line = redact(
            json.dumps({"event": kind, "time_s": round(time.perf_counter() - self.t0, 3), **record})
        )
        if self.local:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self.lines.append(line)
        if console:
            print(redact(console), flush=True)
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def flush(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.flush()
        if not self.local:
            with fsspec.open(self.url, "w") as f:
                f.write(self._history + "".join(line + "\n" for line in self.lines))

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self.local:
            self._file.close()
        if self.tb is not None:
            self.tb.close()


def format_step(r: dict[str, Any]) -> str:
    return (
        f"epoch {r['epoch']} step {r['step']}/{r['total_steps']} loss {r['loss']:.4f} "
        f"lr {r['lr']:.4g} {r['img_per_s']:,.0f} img/s ({r['img_per_s_per_rank']:,.0f}/rank) "
        f"data-wait {100 * r['data_wait_frac']:.0f}% mem {r['peak_mem_mb']:,.0f} MB"
    )


def format_eval(r: dict[str, Any]) -> str:
    ema = f" | ema top1 {100 * r['ema_top1']:.2f}%" if "ema_top1" in r else ""
    return (
        f"eval at epoch {r['epoch']:g} (step {r['step']}): top1 {100 * r['top1']:.2f}% loss {r['loss']:.4f} "
        f"on {r['samples']:,} images{ema}"
    )
