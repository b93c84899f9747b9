"""shard-write: what index, checksums and validation cost when packing shards.

Five ways through the same files, in one run, per dataset:

(a) ``wds-shardwriter``: webdataset's ShardWriter copying the files (image,
    label, metadata; no index, no hash, no validation), one process: what
    most users run today;
(a2) ``wds-shardwriter-2proc``: the same in as many processes as pack uses,
    each writing the shards of its part of the input (webdataset's own advice
    for parallel writing): the fair baseline for (b);
(b) ``pack-novalidate``: ``shard pack --no-validate --workers 2`` (index and
    sha256 on), compared with (a) and (a2);
(c) ``decode-only``: a bare loop that reads and fully decodes every file with
    PIL in 2 processes and writes nothing: the floor for validation;
(d) ``pack-validate``: ``shard pack --workers 2`` with full-decode
    validation, compared with (c);
(c2) ``decode-only-turbo``: (c) with libjpeg-turbo through simplejpeg, the
    decoder pack validates kept JPEGs with: (d)/(c2) is what packing costs
    beyond its own decode (reported, not a goal).

Goals on a 2-core machine: (b)/(a) >= 1.0 and (d)/(c) >= 0.9; (b)/(a2) is
reported beside (b)/(a). Every timed
run includes its own process start-up. Data: CIFAR-10 train (a subset with
--quick) and the 500-image ImageNet sample from the shared data folder
(SHARDFLOW_SHARED_DATA, default ../shared/data next to the repository); with
--quick and no data, synthetic images stand in.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks import data
from benchmarks.decode_worker import decode_files, decode_files_turbo
from benchmarks.harness import Measurement, measure, shared_data
from benchmarks.shardwriter_worker import write_part
from shard_tools.pack import worker_context

WORKERS = 2
DECODE_BATCH = 32


def add_arguments(parser) -> None:
    parser.add_argument(
        "--cifar-limit",
        type=int,
        default=None,
        help="images of CIFAR-10 train to use (default: all; 2000 with --quick)",
    )
    data.add_work_dir_argument(parser)


def _shardwriter_copy(source: data.Source, out: Path) -> int:
    import webdataset as wds

    out.mkdir(parents=True)
    ids = {name: i for i, name in enumerate(sorted(set(source.labels)))}
    with wds.ShardWriter(
        str(out / "shard-%06d.tar"), maxcount=10_000, maxsize=256e6, verbose=0
    ) as sink:
        for i, (path, label) in enumerate(zip(source.files, source.labels, strict=True)):
            meta = {"source": str(path), "label": ids[label], "class": label}
            sink.write(
                {"__key__": f"{i:010d}", "jpg": path.read_bytes(), "cls": ids[label], "json": meta}
            )
    return len(source.files)


def _shardwriter_parallel(source: data.Source, out: Path) -> int:
    """(a2): WORKERS ShardWriter processes, each over a contiguous part of the input."""
    out.mkdir(parents=True)
    ids = {name: i for i, name in enumerate(sorted(set(source.labels)))}
    files = [str(p) for p in source.files]
    step = -(-len(files) // WORKERS)
    parts = [(files[i : i + step], source.labels[i : i + step], ids,
              str(out / f"part{i // step}-shard-%06d.tar"), i) for i in range(0, len(files), step)]  # fmt: skip
    with ProcessPoolExecutor(max_workers=WORKERS, mp_context=_writer_context()) as ex:
        return sum(ex.map(write_part, *zip(*parts, strict=True)))


def _writer_context():
    """pack's fork server, also preloading webdataset: the baseline's workers then start
    as cheaply as pack's (the server starts in the untimed warm-up run)."""
    ctx = worker_context()
    ctx.set_forkserver_preload(["shard_tools.validate", "benchmarks.shardwriter_worker"])
    return ctx


def _decode_only(files: list[Path], task=decode_files) -> int:
    paths = [str(p) for p in files]
    batches = [paths[i : i + DECODE_BATCH] for i in range(0, len(paths), DECODE_BATCH)]
    # The same fork server as `shard pack` uses, so both pay the same start-up.
    with ProcessPoolExecutor(max_workers=WORKERS, mp_context=worker_context()) as ex:
        return sum(ex.map(task, batches))


def _pack(src: str, out: Path, *, validate: bool) -> int:
    from shard_tools.config import PackConfig
    from shard_tools.pack import pack

    cfg = PackConfig(src=src, dest=str(out), workers=WORKERS, validate=validate)
    result = pack(cfg, progress=False)
    return result.manifest.samples + result.rejected


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _with_mb(m: Measurement, mb: float) -> Measurement:
    return Measurement(
        name=m.name + " MB/s",
        unit="MB/s",
        items=mb,
        seconds=list(m.seconds),
        params=m.params,
        baseline=m.baseline + " MB/s" if m.baseline else None,
    )


def _measure_dataset(name: str, source: data.Source, work: Path, repeats: int) -> list[Measurement]:
    src, files = source.src, source.files
    n = len(files)
    mb = source.mb
    params = {"images": n, "source_mb": round(mb, 1), "workers": WORKERS}
    out = work / "out-shard-write"
    a = measure(
        f"{name}/a wds-shardwriter",
        lambda: _shardwriter_copy(source, _fresh(out)),
        items=n,
        repeats=repeats,
        params=params,
    )
    a2 = measure(
        f"{name}/a2 wds-shardwriter-{WORKERS}proc",
        lambda: _shardwriter_parallel(source, _fresh(out)),
        items=n,
        repeats=repeats,
        params=params,
    )
    b = measure(
        f"{name}/b pack-novalidate",
        lambda: _pack(src, _fresh(out), validate=False),
        items=n,
        repeats=repeats,
        params=params,
        baseline=a.name,
    )
    c = measure(
        f"{name}/c decode-only",
        lambda: _decode_only(files),
        items=n,
        repeats=repeats,
        params=params,
    )
    d = measure(
        f"{name}/d pack-validate",
        lambda: _pack(src, _fresh(out), validate=True),
        items=n,
        repeats=repeats,
        params=params,
        baseline=c.name,
    )
    # Not a goal, for transparency: pack validates kept JPEGs with libjpeg-turbo
    # (simplejpeg), so (d) is also set beside a decode-only loop with that decoder:
    # what packing costs beyond the decode it does.
    c2 = measure(
        f"{name}/c2 decode-only-turbo",
        lambda: _decode_only(files, decode_files_turbo),
        items=n,
        repeats=repeats,
        params=params,
    )
    shutil.rmtree(out, ignore_errors=True)
    return [a, a2, b, c, d, c2, *(_with_mb(m, mb) for m in (a, a2, b, c, d, c2))]


def run(args) -> tuple[list[Measurement], dict]:
    # Other processes on the machine skew every figure here: record how busy it was.
    notes: dict = {"load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    with data.work_dir(args.work_dir, "shard-write") as work:
        limit = args.cifar_limit or (data.QUICK_CIFAR if args.quick else None)
        datasets = []
        cifar = data.cifar10(work, limit=limit)
        imagenet = data.imagenet_sample(work)
        if cifar:
            datasets.append(("cifar10", cifar))
        if imagenet:
            datasets.append(("imagenet500", imagenet))
        if not datasets:
            if not args.quick:
                raise SystemExit(
                    f"shard-write: no data under {shared_data()} (use --quick for synthetic images)"
                )
            datasets = [
                ("synth32", data.synthetic(work, "synth32", per_class=200, size=32)),
                ("synth256", data.synthetic(work, "synth256", per_class=20, size=256)),
            ]
            notes["data"] = "synthetic images (shared data not found)"
        results: list[Measurement] = []
        for name, source in datasets:
            print(f"-- {name}: {len(source.files):,} images", flush=True)
            results += _measure_dataset(name, source, work, args.repeats)
    by = {m.name: m for m in results}
    for name, _ in datasets:
        for x, base in (
            ("b pack-novalidate", "a wds-shardwriter"),
            ("d pack-validate", "c decode-only"),
        ):
            ratio = by[f"{name}/{x}"].median / by[f"{name}/{base}"].median
            notes[f"{name} {x[0]}/{base[0]}"] = round(ratio, 3)
        fair = (
            by[f"{name}/b pack-novalidate"].median
            / by[f"{name}/a2 wds-shardwriter-{WORKERS}proc"].median
        )
        notes[f"{name} b/a2 (ShardWriter in {WORKERS} processes)"] = round(fair, 3)
        turbo = by[f"{name}/d pack-validate"].median / by[f"{name}/c2 decode-only-turbo"].median
        notes[f"{name} d/c2 (same decoder, not a goal)"] = round(turbo, 3)
    notes["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    notes["goals"] = "b/a >= 1.0, d/c >= 0.9 (2 workers on 2 cores)"
    notes["timing"] = json.dumps(
        {"warmup": 1, "repeats": args.repeats, "includes": "process start-up"}
    )
    return results, notes
