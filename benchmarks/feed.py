"""feed: what the DALI feed costs the training thread, and what it delivers.

Per dataset (the ImageNet sample at 224 px, CIFAR-10 train at 32 px, packed as
the pipeline suite packs them), every figure beside its baseline from the same
run, repetitions interleaved round by round:

* ``dali-cpu/process`` and ``dali-cpu/thread``: our loader with the shard reader
  in a process of its own (the default) and in threads of the training process,
  against DALI's own ``readers.webdataset`` with the same graph and threads
  (``dali-native-wds``, the baseline): img/s;
* ``reader-alone/process``: the reader process alone (ranged reads, byte checks,
  planned order, per-sample augmentation draws, the hand-over through shared
  memory), its batches taken by this process with no decoding: img/s (the
  reader is one process, so about one core); ``reader-alone/process-files``: the
  same with images handed over as spans of the shard files (share_files: what
  dali-cpu does for photos); ``reader-alone/thread``: the same
  reading in threads of this process, without the hand-over, the baseline. For
  ImageNet also on ``imagenet-x10`` (the sample listed 10 times: 5,000 samples,
  one epoch per round), where an epoch's start (its plan, the first shuffle-buffer
  fill) does not come every 500 samples as it does on the sample itself (the
  dali-cpu figures too);
* ``train-thread-ms``: CPU time of the training thread per batch taken
  (``time.thread_time`` around each ``next``), process against thread reader;
* ``neighbour``: a training-step proxy (``--gil-ms`` of Python work holding the
  GIL + ``--kernel-ms`` of sleep, as a GPU step releases it) fed by the loader
  with decoding replaced by a trivial graph (eval order, no augmentation inputs),
  against the same steps with no data: steps/s, the ratio is what reading,
  checking and handing over cost a training loop;
* ``first-batch-s`` and ``builds``: seconds from ``build_loader`` to the first
  batch, and DALI pipelines built over 3 epochs and a resume (goal: 1).

Our loader's feeder goes on into the next epoch between runs; each run waits for
that work ahead before its time stops (``settle``), so it is charged to the run
that the next one takes it from. DALI's own reader prefetches too (2 batches),
which is not charged to its run. What a job leaves running in the background
ends in a pause (``QUIET_S``) before the next job's clock starts.

On a 2-core machine the DALI threads, the reader process and the training
thread share two cores, so the neighbour ratio there measures contention as
much as the feed; the GPU machine's 16 cores are what its goal (>= 0.98) is for.
"""

from __future__ import annotations

import dataclasses
import time

from benchmarks import data
from benchmarks.harness import Measurement, measure
from benchmarks.pipeline_read import (
    _dali_native_run,
    _items,
    _load,
    _loader_run,
    _reader_only,
    next_epoch_job,
    settle,
)

THREADS = 2
# The ImageNet sample listed this many times for the reader-alone figures' steady state.
STEADY_COPIES = 10
# Between two jobs timed, what the last one left running in the background (DALI's own
# reader prefetching, a batch still in our decoder) ends before the next one's clock starts.
QUIET_S = 0.3


def add_arguments(parser) -> None:
    data.add_work_dir_argument(parser)
    parser.add_argument("--only", default=None, help="comma-separated datasets: imagenet,cifar")
    parser.add_argument("--gil-ms", type=float, default=4.0,
                        help="Python work per proxy training step, GIL held (default 4)")  # fmt: skip
    parser.add_argument("--kernel-ms", type=float, default=14.5,
                        help="GIL-free wait per proxy training step (default 14.5)")  # fmt: skip


def _cfg(ds: dict, reader: str):
    from pipeline import LoaderConfig

    return LoaderConfig(data=ds["root"], backend="dali-cpu", batch_size=ds["batch"],
                        image_size=ds["image_size"], recipe=ds["recipe"], num_threads=THREADS,
                        seed=0, reader=reader)  # fmt: skip


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    x = 0
    while time.perf_counter() < end:  # pure Python: holds the GIL like a training loop's glue
        x += 1


def _trivial_graph(encoded, cfg, device, params=None):
    """Decoding replaced by a slice of each sample's first bytes: what is left of the
    loader's cost is reading, checking and handing over."""
    from nvidia.dali import fn

    head = fn.slice(encoded, [0], [192], axes=[0], out_of_bounds_policy="pad")
    return fn.reshape(head, shape=[8, 8, 3])


def _trivial_loader(cfg):
    from pipeline import World, build_loader, dali_graph

    loader = build_loader(cfg, World())
    real = dali_graph.build_graph
    dali_graph.build_graph = _trivial_graph
    try:
        loader.backend.pipeline()  # built once, here, with the trivial graph
    finally:
        dali_graph.build_graph = real
    return loader


def _neighbour_run(loader, steps: int, gil_ms: float, kernel_ms: float):
    def forever():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            epoch += 1
            yield from loader

    batches = forever() if loader is not None else None

    def run() -> int:
        for _ in range(steps):
            if batches is not None:
                next(batches)
            _busy(gil_ms)
            time.sleep(kernel_ms / 1e3)  # the GPU's share of a step: the GIL is free
        if loader is not None:
            settle(loader)
        return steps

    return run


def _reader_process_only(cfg, epochs: int, loaders: list, share_files: bool = False):
    """The reader process's batches (image bytes in shared memory, or with SHARE_FILES
    views of the shard files; augmentation drawn), taken as the DALI feeder takes them,
    minus decoding. What it starts is appended to LOADERS, for the caller to close."""
    from pipeline import World, build_loader
    from pipeline.readerproc import ReaderProcess

    loader = build_loader(cfg, World())
    reader = ReaderProcess(loader.cfg, slots=max(2, loader.cfg.prefetch + 1),
                           share_files=share_files)  # fmt: skip
    loaders += [loader, reader]
    state = {"epoch": 0}

    def run() -> int:
        done = 0
        for _ in range(epochs):
            for enc, _params in reader.batches(next_epoch_job(loader, state)):
                done += len(enc.keys)
        return done

    return run


def _first_batch_and_builds(ds: dict) -> tuple[float, int]:
    from pipeline import World, build_loader
    from pipeline.dali_backend import DaliBackend

    before = DaliBackend.builds
    t = time.perf_counter()
    with build_loader(_cfg(ds, "auto"), World()) as loader:
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t
        it.close()
        for epoch in range(3):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
        state = loader.state_dict()
        loader.load_state_dict(state)
        list(loader)
    return first, DaliBackend.builds - before


def _measure_dataset(ds: dict, args, notes: dict) -> list[Measurement]:
    name = ds["name"]
    jobs: list[tuple[Measurement, object]] = []
    loaders = []
    thread_ms = {"process": [], "thread": []}
    for tds in [ds, *ds.get("steady", [])]:
        items = _items(tds["root"], tds["batch"], tds["epochs"])
        base = f"dali-native-wds/{tds['name']}"
        jobs.append((Measurement(name=base, unit="img/s", items=items),
                     _dali_native_run(tds, tds["epochs"])))  # fmt: skip
        for reader in ("process", "thread"):
            ms = thread_ms[reader] if tds is ds else None
            loader, run = _loader_run(_cfg(tds, reader), tds["epochs"], ms)
            loaders.append(loader)
            jobs.append((Measurement(name=f"dali-cpu/{reader}/{tds['name']}", unit="img/s",
                                     items=items, baseline=base), run))  # fmt: skip
    for rds in [ds, *ds.get("steady", [])]:
        ritems = _items(rds["root"], rds["batch"], rds["epochs"])
        rbase = f"reader-alone/thread/{rds['name']}"
        run = _reader_only(_cfg(rds, "thread"), rds["epochs"], draws=True, loaders=loaders)
        jobs.append((Measurement(name=rbase, unit="img/s", items=ritems), run))
        for kind, share in (("process", False), ("process-files", True)):
            run = _reader_process_only(_cfg(rds, "process"), rds["epochs"], loaders, share)
            jobs.append((Measurement(name=f"reader-alone/{kind}/{rds['name']}", unit="img/s",
                                     items=ritems, baseline=rbase), run))  # fmt: skip
    steps = 100  # ~2 s of proxy steps per round
    nbase = f"neighbour/no-data/{name}"
    jobs.append((Measurement(name=nbase, unit="steps/s", items=steps),
                 _neighbour_run(None, steps, args.gil_ms, args.kernel_ms)))  # fmt: skip
    for reader in ("process", "thread"):
        # eval order, no augmentation inputs: the trivial graph reads the bytes alone
        loader = _trivial_loader(dataclasses.replace(_cfg(ds, reader), train=False))
        loaders.append(loader)
        jobs.append((Measurement(name=f"neighbour/{reader}/{name}", unit="steps/s", items=steps,
                                 baseline=nbase),
                     _neighbour_run(loader, steps, args.gil_ms, args.kernel_ms)))  # fmt: skip
    try:
        for m, run in jobs:  # warm-up: process start, DALI init, page cache
            measure(m.name, run, items=m.items, unit=m.unit, warmup=0, repeats=1, progress=None)
        for reader in thread_ms:
            thread_ms[reader].clear()
        for r in range(args.repeats):
            for m, run in jobs:
                time.sleep(QUIET_S)
                one = measure(m.name, run, items=m.items, unit=m.unit, warmup=0, repeats=1,
                              progress=None)  # fmt: skip
                m.seconds += one.seconds
                print(f"  {m.name}: round {r + 1}/{args.repeats} "
                      f"{m.items / one.seconds[0]:,.1f} {m.unit}", flush=True)  # fmt: skip
    finally:
        for loader in loaders:
            loader.close()
    out = [m for m, _ in jobs]
    for reader, values in thread_ms.items():
        out.append(Measurement(name=f"train-thread-ms/{reader}/{name}", unit="ms/batch",
                               items=1, values=values,
                               baseline=None if reader == "thread" else
                               f"train-thread-ms/thread/{name}"))  # fmt: skip
    firsts, builds = [], []
    for _ in range(args.repeats):
        first, built = _first_batch_and_builds(ds)
        firsts.append(first)
        builds.append(float(built))
    out.append(Measurement(name=f"first-batch-s/{name}", unit="s", items=1, values=firsts))
    out.append(Measurement(name=f"builds/{name}", unit="pipelines", items=1, values=builds))
    return out


def run(args) -> tuple[list[Measurement], dict]:
    from pipeline import stream

    notes: dict = {
        "setup": f"dali-cpu, {THREADS} DALI threads, fp32 channels_last out, train augmentation "
        "(ImageNet: random-resized-crop 224 + flip; CIFAR: pad 4 + crop 32 + flip); DALI's own "
        "reader with the same graph and threads is the baseline",
        "neighbour step": f"{args.gil_ms} ms Python holding the GIL + {args.kernel_ms} ms "
        "GIL-free sleep per batch",
        "goals": "dali-cpu/process >= 1.0x DALI's reader; training thread <= 0.2 ms per batch; "
        "reader alone (process) >= 30k img/s; neighbour >= 0.98x; builds 1",
    }
    with data.work_dir(args.work_dir, "feed-bench") as work:
        datasets = data.loader_datasets(work, quick=args.quick, only=args.only, cifar_limit=(
            data.QUICK_CIFAR if args.quick else None), epochs=None, workers=THREADS)  # fmt: skip
        for ds in datasets:
            if ds["name"] == "imagenet" and not args.quick:
                photos = data.imagenet_sample(work, copies=STEADY_COPIES)
                # the copies are the same bytes: validating them again adds nothing
                root = data.pack_once(photos, work, max_count=100, workers=THREADS,
                                      validate=False)  # fmt: skip
                ds["steady"] = [dict(ds, name=f"imagenet-x{STEADY_COPIES}", root=root, epochs=1)]
        notes["load average at start (1/5/15 min)"] = _load()
        out: list[Measurement] = []
        # A round of this suite comes back to each loader after a minute or more, longer
        # than a training loop's epoch boundary lasts: the feeder's work ahead is kept for
        # the next round as it is for the next epoch (not dropped after AHEAD_FOR_S).
        kept = stream.AHEAD_FOR_S
        stream.AHEAD_FOR_S = 3600.0
        try:
            for ds in datasets:
                print(f"-- {ds['name']}: {ds['root']}", flush=True)
                out += _measure_dataset(ds, args, notes)
        finally:
            stream.AHEAD_FOR_S = kept
        notes["load average at end (1/5/15 min)"] = _load()
    return out, notes
