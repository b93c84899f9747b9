"""The one small harness every benchmark suite shares.

Rules (after timm's benchmark.py and torchtitan's benchmarks/README): warm-up
runs are excluded, several timed repetitions are reported as median, min and
max, CUDA work is synchronised before a clock is read, and every result file
carries the environment it was measured in. A figure is only ever reported
beside a baseline measured in the same run, as a ratio.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from train.metrics import git_dirty, git_sha


class BenchmarkError(RuntimeError):
    """A measurement that measured nothing (0 items of work): never a result."""


@dataclass(kw_only=True)
class Measurement:
    """One configuration measured REPEATS times: ``items`` of work per repetition."""

    name: str  # e.g. "dali-cpu/imagenet/local"
    unit: str  # e.g. "img/s" or "MB/s"
    items: float  # work units per repetition (images, megabytes)
    seconds: list[float] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None  # name of the Measurement this one is compared against
    # A figure that is not a rate (seconds to a first batch, bytes of memory): its values
    # as measured, reported as they are instead of ITEMS / SECONDS.
    values: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        if self.values:
            return list(self.values)
        return [self.items / s for s in self.seconds if s > 0]

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    def summary(self) -> dict[str, Any]:
        rates = self.rates
        return {
            **asdict(self),
            "median": self.median,
            "min": min(rates) if rates else float("nan"),
            "max": max(rates) if rates else float("nan"),
        }


def _sync() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except ImportError:
        pass


def measure(
    name: str,
    run: Callable[[], float | None],
    *,
    items: float,
    unit: str = "img/s",
    warmup: int = 1,
    repeats: int = 3,
    baseline: str | None = None,
    params: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = print,
) -> Measurement:
    """Time RUN: WARMUP untimed calls, then REPEATS timed ones.

    RUN may return the number of work items it actually did (overriding ITEMS
    for that repetition's rate), so a loader that yields a ragged last batch is
    counted honestly.
    """
    if items <= 0:
        raise BenchmarkError(f"{name}: {items} items of work per run; nothing to time")
    m = Measurement(name=name, unit=unit, items=items, baseline=baseline, params=params or {})
    for _ in range(warmup):
        if run() == 0:
            raise BenchmarkError(f"{name}: the warm-up run did 0 items of work; nothing to time")
        _sync()
    for i in range(repeats):
        _sync()
        t0 = time.perf_counter()
        done = run()
        _sync()
        dt = time.perf_counter() - t0
        if done is not None and done <= 0:
            raise BenchmarkError(f"{name}: run {i + 1} did {done} items of work; nothing to time")
        # Normalise so that items/seconds is the rate of this repetition.
        m.seconds.append(dt * (items / done) if done else dt)
        if progress:
            progress(f"  {name}: run {i + 1}/{repeats} {items / m.seconds[-1]:,.0f} {unit}")
    return m


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return getattr(mod, "__version__", "unknown")
    except Exception:
        return None


def shared_data() -> Path:
    """The project's real datasets: SHARDFLOW_SHARED_DATA, else ../shared/data next to the repo."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("SHARDFLOW_SHARED_DATA", default))


def environment() -> dict[str, Any]:
    """Versions, CPU and GPU of the machine a result was measured on."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {
            m: _version(m)
            for m in (
                "torch",
                "torchvision",
                "nvidia.dali",
                "webdataset",
                "PIL",
                "numpy",
                "fsspec",
                "s3fs",
            )
        },
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratios(measurements: list[Measurement]) -> dict[str, float]:
    """name -> median / median of its baseline, for every measurement that names one."""
    by_name = {m.name: m for m in measurements}
    out = {}
    for m in measurements:
        if m.baseline and m.baseline in by_name and by_name[m.baseline].median > 0:
            out[m.name] = m.median / by_name[m.baseline].median
    return out


def markdown_table(measurements: list[Measurement]) -> str:
    rat = ratios(measurements)
    lines = [
        "| what | median | min | max | unit | vs baseline |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for m in measurements:
        s = m.summary()
        vs = (
            f"{rat[m.name]:.2f}x {m.baseline}"
            if m.name in rat
            else "baseline"
            if m.baseline is None
            else "-"
        )
        fmt = _figure if m.unit == "s" else (lambda v: f"{v:,.1f}")
        lines.append(
            f"| {m.name} | {fmt(s['median'])} | {fmt(s['min'])} | {fmt(s['max'])} | {m.unit} | {vs} |"
        )
    return "\n".join(lines) + "\n"


def _figure(value: float) -> str:
    """Three significant digits (seconds from milliseconds to minutes)."""
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def result_stem(suite: str, env: dict[str, Any]) -> str:
    device = (env.get("gpu") or f"cpu{env.get('cpu_count')}").replace(" ", "-").lower()
    torch_v = (env["versions"].get("torch") or "none").split("+")[0]
    date = env["date"][:10]
    return f"{suite}_{device}_torch{torch_v}_{date}"


def write_results(
    suite: str,
    measurements: list[Measurement],
    out_dir: str | os.PathLike,
    *,
    notes: dict[str, Any] | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Write JSON (raw timings + environment), Markdown and, if matplotlib is
    installed, a PNG bar chart. Returns the written paths."""
    env = environment()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(suite, env)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    payload = {
        "suite": suite,
        "environment": env,
        "results": [m.summary() for m in measurements],
        "ratios": ratios(measurements),
        "notes": notes or {},
    }
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    header = (
        f"## {suite}\n\n{env['date']} · {env['cpu_model']} ({env['cpu_count']} cores)"
        f" · GPU: {env['gpu'] or 'none'} · torch {env['versions']['torch']}"
        f" · DALI {env['versions']['nvidia.dali']} · git {env['git_sha']}"
        f"{' (uncommitted changes)' if env['git_dirty'] else ''}\n\n"
    )
    body = markdown_table(measurements)
    if notes:
        body += "\n" + "\n".join(f"- {k}: {v}" for k, v in notes.items()) + "\n"
    paths["md"].write_text(header + body)
    if plot:
        png = _bar_plot(suite, measurements, out / f"{stem}.png")
        if png:
            paths["png"] = png
    return paths


def _bar_plot(suite: str, measurements: list[Measurement], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [m.name for m in measurements]
    med = [m.median for m in measurements]
    lo = [m.median - m.summary()["min"] for m in measurements]
    hi = [m.summary()["max"] - m.median for m in measurements]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    ax.barh(names, med, xerr=[lo, hi], color="#4878a8")
    ax.invert_yaxis()
    units = sorted({m.unit for m in measurements})
    ax.set_xlabel(" / ".join(units) + " (median, whiskers min-max)")
    ax.set_title(suite)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
