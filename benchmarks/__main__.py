"""Entry point: ``python -m benchmarks <suite> [options]``.

Each suite is a module with ``add_arguments(parser)`` and ``run(args) ->
(list[Measurement], notes: dict)``; this file only dispatches and writes the
results. ``args.quick`` and ``args.repeats`` are set for every suite.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from benchmarks.harness import markdown_table, write_results

# suite name -> module; a suite whose module is missing is reported, not crashed on.
SUITES = {
    "shard-write": "benchmarks.shard_write",
    "pipeline": "benchmarks.pipeline_read",
    "train": "benchmarks.train_step",
    "e2e": "benchmarks.e2e",
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", choices=[*SUITES, "all"], help="what to measure")
    parser.add_argument("--quick", action="store_true", help="small sizes, one timed repetition")
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help="results folder (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions (default: 3, 1 with --quick)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    known, rest = parser.parse_known_args(argv)
    names = list(SUITES) if known.suite == "all" else [known.suite]
    status = 0
    for name in names:
        try:
            module = importlib.import_module(SUITES[name])
        except ModuleNotFoundError as exc:
            print(f"benchmarks: suite {name} is not available ({exc})", file=sys.stderr)
            status = 1
            continue
        sub = argparse.ArgumentParser(prog=f"python -m benchmarks {name}")
        module.add_arguments(sub)
        args, unknown = sub.parse_known_args(rest)
        if unknown and known.suite != "all":
            sub.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.quick = known.quick
        args.out = known.out
        args.repeats = known.repeats or (1 if known.quick else 3)
        print(f"== {name}{' (quick)' if known.quick else ''}", flush=True)
        measurements, notes = module.run(args)
        paths = write_results(name, measurements, known.out, notes=notes, plot=not known.no_plot)
        print(markdown_table(measurements))
        for k, v in (notes or {}).items():
            print(f"- {k}: {v}")
        print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
