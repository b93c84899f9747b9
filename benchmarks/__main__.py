"""Entry point: ``python -m benchmarks <suite> [options]``.

Each suite is a module with ``add_arguments(parser)`` and ``run(args) ->
(list[Measurement], notes: dict)``; this file only dispatches and writes the
results. ``args.quick``, ``args.out`` and ``args.repeats`` are set for every
suite. A suite may also define ``final_table(measurements, notes) -> str``,
printed last. ``all`` runs every suite but ``gpu`` (the GPU machine's own
run) and shares one work folder between them, so the data are extracted and
packed once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
from pathlib import Path

from benchmarks import data
from benchmarks.harness import BenchmarkError, markdown_table, write_results

# suite name -> module; a suite whose module is missing is reported, not crashed on.
SUITES = {
    "shard-write": "benchmarks.shard_write",
    "pipeline": "benchmarks.pipeline_read",
    "train": "benchmarks.train_step",
    "e2e": "benchmarks.e2e",
    "scale": "benchmarks.scale",
    "feed": "benchmarks.feed",
    "gpu": "benchmarks.gpu_suite",
}
IN_ALL = ("shard-write", "pipeline", "train", "e2e", "scale", "feed")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _common_options() -> argparse.ArgumentParser:
    """The options every suite takes (a parent parser, so a suite's --help lists them)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="small sizes, one timed repetition")
    common.add_argument(
        "--out", default=str(DEFAULT_OUT), help="results folder (default: %(default)s)"
    )
    common.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions (default: 3, 1 with --quick)"
    )
    common.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    return common


def main(argv: list[str] | None = None) -> int:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, parents=[common], add_help=False
    )
    parser.add_argument(
        "suite",
        nargs="?",
        choices=[*SUITES, "all"],
        help="what to measure (all: every suite but gpu); SUITE --help lists its options",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    known, rest = parser.parse_known_args(argv)
    if known.help:
        if known.suite in SUITES:  # the suite's own options beside the common ones
            sub = argparse.ArgumentParser(prog=f"python -m benchmarks {known.suite}",
                                          parents=[common])  # fmt: skip
            importlib.import_module(SUITES[known.suite]).add_arguments(sub)
            sub.print_help()
        else:
            parser.print_help()
        return 0
    if known.suite is None:
        parser.error("the following arguments are required: suite")
    names = list(IN_ALL) if known.suite == "all" else [known.suite]
    status = 0
    with contextlib.ExitStack() as stack:
        shared_work = None
        if known.suite == "all":
            probe = argparse.ArgumentParser(add_help=False)
            data.add_work_dir_argument(probe)
            given = probe.parse_known_args(rest)[0].work_dir
            shared_work = stack.enter_context(data.work_dir(given, "bench-all"))
        for name in names:
            status = max(status, _run_suite(name, known, rest, shared_work))
    return status


def _run_suite(name: str, known, rest: list[str], shared_work: Path | None) -> int:
    try:
        module = importlib.import_module(SUITES[name])
    except ModuleNotFoundError as exc:
        print(f"benchmarks: suite {name} is not available ({exc})", file=sys.stderr)
        return 1
    sub = argparse.ArgumentParser(prog=f"python -m benchmarks {name}")
    module.add_arguments(sub)
    args, unknown = sub.parse_known_args(rest)
    if unknown and known.suite != "all":
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if shared_work is not None and hasattr(args, "work_dir"):
        args.work_dir = str(shared_work)
    args.quick = known.quick
    args.out = known.out
    args.repeats = known.repeats or (1 if known.quick else 3)
    print(f"== {name}{' (quick)' if known.quick else ''}", flush=True)
    t0 = time.perf_counter()
    try:
        measurements, notes = module.run(args)
    except BenchmarkError as exc:
        print(f"benchmarks: {name}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    paths = write_results(name, measurements, known.out, notes=notes, plot=not known.no_plot)
    print(markdown_table(measurements))
    for k, v in (notes or {}).items():
        print(f"- {k}: {v}")
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    print(f"== {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    final = getattr(module, "final_table", None)
    if final is not None:
        table = final(measurements, notes)
        with open(paths["md"], "a") as f:
            f.write("\n" + table)
        print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
