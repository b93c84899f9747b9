"""pipeline: how fast each loader backend delivers training batches.

Per dataset (the 500-photo ImageNet sample at 224 px with random-resized-crop
+ flip; CIFAR-10 train at 32 px with pad-crop + flip), packed once with
``shard_tools.pack`` into --work-dir and uploaded to a SeaweedFS S3 server
started for the run:

* ``torch``: our torch backend (torchvision decode + v2 transforms in 2 worker
  processes) -- THE baseline every other backend is compared with;
* ``dali-cpu``: the same reader feeding DALI on the CPU (2 threads);
* ``device-cache`` (CIFAR): decoded once into a uint8 tensor, augmented with
  tensor ops;
* ``synthetic``: random tensors, the ceiling;
* ``wds-dataloader``: webdataset + PIL + DataLoader (what most users run);
* ``dali-native-wds``: DALI's own ``readers.webdataset`` on the local files
  with our graph: the alternative to our reader for local paths;
* ``read``: the shards read whole (MB/s) and through our reader without decode
  (img/s), local disk vs S3.

Each timed repetition iterates --epochs full epochs of a loader built before
the clock starts (warm-up repetition excluded); repetitions of all
configurations are interleaved round by round, so that load from other
processes on a shared machine falls on every configuration alike. Goals on 2 cores:
dali-cpu >= 1.5x torch on the ImageNet photos; S3 >= 0.8x local.
Data come from SHARDFLOW_SHARED_DATA (default ../shared/data next to the
repository); with --quick and no data, synthetic images stand in.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from benchmarks import data
from benchmarks.harness import Measurement, measure

WORKERS = 2


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def add_arguments(parser) -> None:
    data.add_work_dir_argument(parser)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per timed repetition (default: 4 ImageNet / 1 CIFAR; 1 with --quick)",
    )
    parser.add_argument(
        "--cifar-limit",
        type=int,
        default=None,
        help="CIFAR-10 train images to use (default: all 50,000; 2,000 with --quick)",
    )
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 server measurements")
    parser.add_argument(
        "--only", default=None, help="comma-separated datasets to run: imagenet,cifar"
    )


# -- runners ---------------------------------------------------------------------
def _loader_run(cfg, epochs: int, thread_ms: list[float] | None = None):
    """(loader, run): RUN iterates EPOCHS epochs; with THREAD_MS, the calling thread's
    CPU milliseconds per batch taken (time.thread_time around each next) are appended
    per epoch."""
    from pipeline import World, build_loader

    loader = build_loader(cfg, World())
    state = {"epoch": 0}

    def run() -> int:
        done = 0
        for _ in range(epochs):
            loader.set_epoch(state["epoch"])
            state["epoch"] += 1
            it = iter(loader)
            steps, cpu = 0, 0.0
            while True:
                t = time.thread_time()
                batch = next(it, None)
                cpu += time.thread_time() - t
                if batch is None:
                    break
                steps += 1
                done += len(batch)
            if thread_ms is not None:
                thread_ms.append(1e3 * cpu / max(1, steps))
        settle(loader)
        return done

    return loader, run


def settle(loader) -> None:
    """Wait, within the run timed, for what LOADER makes ahead of the training loop (the
    DALI feeder goes on into the next epoch): the next run takes it ready, so it is
    charged here, not to whatever is timed between the two."""
    wait = getattr(loader.backend, "wait_ahead", None)
    if wait is not None:
        wait()


def _items(root: str, batch: int, epochs: int, storage_options=None) -> int:
    from shard_tools.format import read_manifest

    n = read_manifest(root, storage_options).samples
    return -(-n // batch) * batch * epochs


def _wds_run(ds: dict, epochs: int):
    from benchmarks.baselines import webdataset_loader

    urls = sorted(str(p) for p in Path(ds["root"]).glob("shard-*.tar"))

    def run() -> int:
        done = 0
        for _ in range(epochs):
            for images, _labels in webdataset_loader(urls, batch_size=ds["batch"], image_size=ds["image_size"], num_workers=WORKERS):  # fmt: skip
                done += len(images)
        return done

    return run


def _dali_native_run(ds: dict, epochs: int):
    """DALI's readers.webdataset over the local shards + our graph (the alternative reader)."""
    from nvidia.dali import Pipeline, fn

    from pipeline import LoaderConfig
    from pipeline.dali_graph import build_graph

    cfg = LoaderConfig(data=ds["root"], backend="dali-cpu", batch_size=ds["batch"],
                       image_size=ds["image_size"], recipe=ds["recipe"], num_threads=WORKERS)  # fmt: skip
    tars = sorted(str(p) for p in Path(ds["root"]).glob("shard-*.tar"))
    pipe = Pipeline(
        batch_size=ds["batch"], num_threads=WORKERS, device_id=None, seed=0, prefetch_queue_depth=2
    )
    with pipe:
        jpg, _cls = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                          ext=["jpg", "cls"], random_shuffle=True, initial_fill=1024,
                                          name="reader", missing_component_behavior="error")  # fmt: skip
        pipe.set_outputs(build_graph(jpg, cfg, "cpu"))
    pipe.build()
    steps = -(-pipe.epoch_size("reader") // ds["batch"])

    def run() -> int:
        import torch

        done = 0
        for _ in range(epochs * steps):
            (out,) = pipe.run()
            done += torch.from_dlpack(out.as_tensor()).shape[0]
        return done

    return run


def _raw_read(root: str, storage_options=None):
    """All shards read whole, WORKERS at a time: MB per repetition."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import LoaderConfig
    from pipeline.storage import Dataset

    ds = Dataset.open(LoaderConfig(data=root, batch_size=1, storage_options=storage_options))
    mb = ds.manifest.bytes / 1e6

    def run() -> float:
        with ThreadPoolExecutor(WORKERS) as pool:
            total = sum(len(b) for b in pool.map(ds.read_bytes, range(len(ds.manifest.shards))))
        return total / 1e6

    return mb, run


def next_epoch_job(loader, state: dict):
    """The whole next epoch of LOADER as a backend's Job (STATE counts the epochs)."""
    from pipeline.loader import Job

    loader.set_epoch(state["epoch"])
    state["epoch"] += 1
    return Job(cfg=loader.cfg, world=loader.world, epoch=loader.epoch, plan=loader.plan(),
               start=0, dataset=loader.dataset, device=loader.device)  # fmt: skip


def _reader_only(cfg, epochs: int, *, draws: bool = False, loaders: list | None = None):
    """Our reader (ranged reads, sanity checks, shuffle order) without decoding; with
    DRAWS also each sample's augmentation draw (what the DALI feed's reader process
    does). The loader is appended to LOADERS, for the caller to close."""
    from pipeline import World, augment, build_loader
    from pipeline.reader import encoded_batches

    loader = build_loader(cfg, World())
    if loaders is not None:
        loaders.append(loader)
    state = {"epoch": 0}

    def run() -> int:
        done = 0
        for _ in range(epochs):
            job = next_epoch_job(loader, state)
            for enc in encoded_batches(job):
                if draws:
                    augment.draw(loader.cfg, enc.key_hash, job.epoch, enc.width, enc.height)
                done += len(enc.keys)
        return done

    return run


# -- the suite -------------------------------------------------------------------
def _measure_dataset(ds: dict, s3, repeats: int, notes: dict) -> list[Measurement]:
    """Build every runner first, then time them in interleaved rounds, so that load
    from other processes on a shared machine hits all configurations alike."""
    from pipeline import LoaderConfig

    name, epochs = ds["name"], ds["epochs"]
    common = dict(batch_size=ds["batch"], image_size=ds["image_size"], recipe=ds["recipe"],
                  num_workers=WORKERS, num_threads=WORKERS, seed=0)  # fmt: skip
    base = f"torch/{name}/local"
    roots = {"local": (ds["root"], None)}
    if s3 is not None:
        roots["s3"] = s3
    items = _items(ds["root"], ds["batch"], epochs)
    jobs: list[tuple[Measurement, object]] = []
    closers = []

    def add(label, run, *, baseline=base, unit="img/s", n=items):
        jobs.append((Measurement(name=label, unit=unit, items=n, baseline=baseline), run))

    for where, (root, opts) in roots.items():
        backends = ["torch", "dali-cpu"] + (["device-cache"] if ds["recipe"] == "small" else [])
        for backend in backends:
            kw = dict(backend=backend)
            if backend == "device-cache":
                kw = dict(backend="torch", cache="device")
            cfg = LoaderConfig(data=root, storage_options=opts, **common, **kw)
            loader, run = _loader_run(cfg, epochs)
            closers.append(loader.close)
            label = f"{backend}/{name}/{where}"
            baseline = (
                f"{backend}/{name}/local" if where == "s3" else (None if label == base else base)
            )
            add(label, run, baseline=baseline)
        local = where == "local"
        rmb, rrun = _raw_read(root, opts)
        add(f"read-whole-shards/{name}/{where}", rrun, unit="MB/s", n=rmb,
            baseline=None if local else f"read-whole-shards/{name}/local")  # fmt: skip
        rcfg = LoaderConfig(data=root, storage_options=opts, **common, backend="torch")
        add(f"reader-no-decode/{name}/{where}", _reader_only(rcfg, epochs),
            baseline=None if local else f"reader-no-decode/{name}/local")  # fmt: skip
    cfg = LoaderConfig(backend="synthetic", synthetic_samples=items // epochs, **common)
    add(f"synthetic/{name}", _loader_run(cfg, epochs)[1])
    add(f"wds-dataloader/{name}/local", _wds_run(ds, epochs))
    try:
        add(f"dali-native-wds/{name}/local", _dali_native_run(ds, epochs))
    except ImportError:
        notes[f"dali-native-wds/{name}"] = "DALI not installed"
    try:
        for m, run in jobs:  # warm-up: worker start, DALI init, page cache
            measure(m.name, run, items=m.items, unit=m.unit, warmup=0, repeats=1, progress=None)
        for r in range(repeats):
            for m, run in jobs:
                one = measure(
                    m.name, run, items=m.items, unit=m.unit, warmup=0, repeats=1, progress=None
                )
                m.seconds += one.seconds
                print(
                    f"  {m.name}: round {r + 1}/{repeats} {m.items / one.seconds[0]:,.0f} {m.unit}",
                    flush=True,
                )
    finally:
        for close in closers:
            close()
    return [m for m, _ in jobs]


def run(args) -> tuple[list[Measurement], dict]:
    notes: dict = {
        "setup": f"{WORKERS} torch workers / {WORKERS} DALI threads, fp32 NCHW channels_last out, "
        "train augmentation (ImageNet: random-resized-crop 224 + flip; CIFAR: pad 4 + crop 32 + flip)",
        "local reads": "local shards are in the page cache after the warm-up repetition",
    }
    server = None
    with data.work_dir(args.work_dir, "pipeline-bench") as work:
        try:
            datasets = data.loader_datasets(
                work,
                quick=args.quick,
                only=args.only,
                cifar_limit=args.cifar_limit or (data.QUICK_CIFAR if args.quick else None),
                epochs=args.epochs,
                workers=WORKERS,
            )
            if not args.no_s3:
                from shard_tools import s3_server

                shutil.rmtree(work / "s3", ignore_errors=True)  # a fresh store every run
                server = s3_server.start(work / "s3", bucket="bench")
                import fsspec

                fs = fsspec.filesystem("s3", **server.storage_options())
                prefix = f"bench/run-{int(time.time())}"
            out: list[Measurement] = []
            notes["load average at start (1/5/15 min)"] = _load()
            for ds in datasets:
                s3 = None
                if server is not None:
                    url = f"s3://{prefix}/{ds['name']}"
                    fs.put(ds["root"].rstrip("/") + "/", url, recursive=True)
                    s3 = (url, server.storage_options())
                print(f"-- {ds['name']}: {ds['root']}", flush=True)
                out += _measure_dataset(ds, s3, args.repeats, notes)
            # Other processes on the machine skew every figure; the ratios suffer least
            # because the rounds are interleaved.
            notes["load average at end (1/5/15 min)"] = _load()
            return out, notes
        finally:
            if server is not None:
                from shard_tools import s3_server

                s3_server.stop(server)
