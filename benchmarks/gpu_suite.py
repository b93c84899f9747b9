"""gpu: the GPU machine's suite, one command: does the GPU wait for data?

    benchmarks/gpu_suite.sh [--data DIR] [--wheels DIR] [--out DIR] [--dry-run]
    python -m benchmarks gpu [--data DIR] [--out DIR] [--dry-run]

1. Packs the ImageNet sample (its 500 photos listed --imagenet-copies times,
   so that an epoch outlasts the timed windows) and CIFAR-10 train (shuffled)
   and test with ``shard pack``, one worker per core.
2. Feed ratios at 224 px, batch 256: ResNet-50 and ResNet-18 training steps
   (bf16 autocast, channels_last, SGD) fed by ``dali-gpu``, by ``synthetic``
   tensors already on the GPU (the ceiling) and by webdataset + DataLoader +
   PIL (one worker per core, resampled shards so the workers start once).
   ResNet-18 and the loader alone also with ``hand_over="files"`` (photos read
   in place from the shard files, image by image, instead of one shared-memory
   buffer per batch). Feed ratio = img/s fed / img/s synthetic. The loaders alone are timed too,
   which names the bottleneck (feed or compute) per model.
3. Decode throughput of DALI's mixed (nvJPEG) decoder with hw_decoder_load 0 /
   0.65 / 0.9: the loader's graph for the ImageNet recipe (ROI decode fused
   with the random resized crop, resize, flip, normalise) behind DALI's
   webdataset reader, with ``LoaderConfig.hw_decoder_load`` set (the
   loader's ``dali-gpu`` backend takes the same field; None = DALI's 0.65).
4. CIFAR-10 time to 94% test top-1 in the small-image mode: the trainer's own
   build (``train.trainer.build``: cifar_fast, device cache, bf16,
   channels_last) and step loop, evaluated after every epoch, stopped at the
   target or after --cifar-epochs (the one-cycle schedule's length).

Timing: warm-up excluded, --repeats timed windows, CUDA synchronised by the
harness; each timed window of part 2 stays inside one epoch. Outputs: JSON,
Markdown and PNG under --out ($OUT in gpu_suite.sh); the summary table is
printed last.

Budget on one H100 (16 cores), estimated from the H200 figures in the
project's notes (RN50 ~4.7k img/s synthetic / ~4.3k DALI-fed, RN18 ~13.7k /
~9k, DataLoader+PIL ~2.2k, mixed decode 10-20k img/s), scaled by ~0.85 for
an H100 and padded ~1.5x: imports, extraction and packing ~1 min; part 2
~2 min (RN50 ~45 s, RN18 ~20 s, loaders alone ~20 s, model builds and
cuDNN autotuning, DataLoader start-up); part 3 ~20 s; part 4 ~1.5 min
(device-cache fill ~10 s, up to 40 epochs at ~1-2 s each); about 5 minutes
in all, under the 8-minute limit.

``--dry-run`` runs the same flow on the CPU with tiny sizes (dali-cpu for
dali-gpu, 64 px, a few steps, one timed window each, one torch thread, the
hw_decoder_load cases on DALI's CPU decoder, where the setting has no
effect; synthetic images if the shared data are missing), so that the flow
is tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import data, e2e
from benchmarks.harness import Measurement, measure

HW_DECODER_LOADS = (0.0, 0.65, 0.9)
FEED_MODELS = ("resnet50", "resnet18")
# CIFAR-10 to 94%: cifar_fast (airbench94's layout, 1/9 logit scale) trained with
# the settings of the DAWNBench ResNet-9 runs (batch 512, SGD-nesterov peak lr 0.4,
# weight decay 5e-4, linear warm-up over the first fifth, then linear decay),
# plus label smoothing 0.2.
CIFAR_FLAGS = (
    "--model", "cifar_fast", "--backend", "torch", "--cache", "device", "--recipe", "small",
    "--lr", "0.4", "--momentum", "0.9", "--nesterov", "--weight-decay", "5e-4",
    "--schedule", "onecycle", "--label-smoothing", "0.2", "--seed", "0",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """Everything that differs between the real run and --dry-run."""

    device: str
    feed_backend: str  # the DALI loader backend compared with synthetic and the baseline
    image_size: int
    batch: int
    steps: int  # timed steps per repetition (part 2)
    decode_steps: int  # batches per timed repetition (part 3)
    imagenet_limit: int | None  # distinct photos used
    imagenet_copies: int
    imagenet_per_shard: int
    cifar_train: int | None  # CIFAR-10 train images (None: all 50,000)
    cifar_test: int | None
    cifar_batch: int
    cifar_epochs: int
    workers: int


def sizes_for(args) -> Sizes:
    """The real GPU sizes, or tiny CPU ones for --dry-run."""
    cores = os.cpu_count() or 1
    if args.dry_run:
        return Sizes(device="cpu", feed_backend="dali-cpu", image_size=64, batch=8,
                     steps=args.steps or 2, decode_steps=2, imagenet_limit=32, imagenet_copies=2,
                     imagenet_per_shard=16, cifar_train=512, cifar_test=256, cifar_batch=128,
                     cifar_epochs=args.cifar_epochs or 1, workers=2)  # fmt: skip
    return Sizes(device="cuda", feed_backend="dali-gpu", image_size=224, batch=256,
                 steps=args.steps or 25, decode_steps=40, imagenet_limit=None,
                 imagenet_copies=args.imagenet_copies, imagenet_per_shard=1000,
                 cifar_train=None, cifar_test=None, cifar_batch=512,
                 cifar_epochs=args.cifar_epochs or 40, workers=cores)  # fmt: skip


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        default=None,
        help="folder holding imagenet-sample-500.tar and cifar10-jpeg.tar.gz "
        "(default: SHARDFLOW_SHARED_DATA, else ../shared/data next to the repository)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the whole flow on the CPU with tiny sizes (dali-cpu, 64 px, a few steps)",
    )
    data.add_work_dir_argument(parser)
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per repetition (default: 25; 2 dry)"
    )
    parser.add_argument(
        "--imagenet-copies",
        type=int,
        default=64,
        help="times each ImageNet photo is listed when packing (default: %(default)s = 32,000 "
        "samples, 125 steps of 256 per epoch)",
    )
    parser.add_argument(
        "--cifar-epochs",
        type=int,
        default=None,
        help="CIFAR-10 epoch cap = one-cycle schedule length (default: 40; 1 dry)",
    )
    parser.add_argument(
        "--target", type=float, default=0.94, help="CIFAR-10 test top-1 to reach (default: 0.94)"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to leave out: feed,decode,cifar"
    )


# -- preflight -------------------------------------------------------------------
def preflight(args) -> None:
    """Fail in one line, before any work, when the real run cannot succeed here."""
    missing = []
    if not args.dry_run and not torch.cuda.is_available():
        missing.append(
            f"a CUDA GPU (torch {torch.__version__} sees none; --dry-run checks the flow on CPU)"
        )
    try:
        import nvidia.dali  # noqa: F401  (a broken install fails here, not minutes later)
    except ImportError as exc:
        how = "pip install -e '.[dali]'" if args.dry_run else "gpu_suite.sh --wheels DIR"
        missing.append(f"NVIDIA DALI ({str(exc).strip().splitlines()[-1]}; {how})")
    for module, why in (("braceexpand", "shard pack"), ("webdataset", "the DataLoader baseline")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module} (for {why}; bring its wheel with --wheels DIR)")
    if not args.dry_run:
        for name in (data.IMAGENET_ARCHIVE, data.CIFAR_ARCHIVE):
            if not (data.shared_data() / name).exists():
                missing.append(f"{data.shared_data() / name} (give the folder with --data DIR)")
    if missing:
        raise SystemExit("gpu: cannot run, missing: " + "; ".join(missing))


# -- data ------------------------------------------------------------------------
def _prepare(work: Path, sz: Sizes, notes: dict) -> dict[str, str]:
    t0 = time.perf_counter()
    photos = data.imagenet_sample(work, limit=sz.imagenet_limit, copies=sz.imagenet_copies)
    train = data.cifar10(work, split="train", limit=sz.cifar_train)
    test = data.cifar10(work, split="test", limit=sz.cifar_test)
    if photos is None or train is None or test is None:  # only --dry-run gets here
        notes["data"] = "synthetic images (the shared data were not found)"
        photos = photos or data.synthetic(work, "photo-like-gpu", per_class=6, size=400)
        train = train or data.synthetic(work, "cifar-like-gpu-train", per_class=50, size=32)
        test = test or data.synthetic(work, "cifar-like-gpu-test", per_class=20, size=32)
    # The copies of a photo are the same bytes: validating them again adds nothing.
    roots = {
        "imagenet": data.pack_once(photos, work, max_count=sz.imagenet_per_shard,
                                   workers=sz.workers, validate=sz.imagenet_copies == 1),
        "cifar-train": data.pack_once(train, work, max_count=5000, workers=sz.workers,
                                      shuffle=True, seed=0),
        "cifar-test": data.pack_once(test, work, max_count=5000, workers=sz.workers),
    }  # fmt: skip
    notes["data"] = notes.get("data", "shared data") + (
        f"; ImageNet: {len(photos.files):,} samples ({photos.name}), CIFAR-10: "
        f"{len(train.files):,} train / {len(test.files):,} test"
    )
    notes["seconds: extract + pack"] = round(time.perf_counter() - t0, 1)
    return roots


# -- part 2: feed ratios ---------------------------------------------------------
def _feed(root: str, sz: Sizes, repeats: int, notes: dict) -> list[Measurement]:
    from pipeline import LoaderConfig
    from shard_tools.format import read_manifest

    device = torch.device(sz.device)
    num_classes = read_manifest(root).num_classes
    items = sz.steps * sz.batch
    common = dict(batch_size=sz.batch, image_size=sz.image_size, recipe="imagenet", seed=0,
                  num_workers=sz.workers, num_threads=sz.workers, device=str(device))  # fmt: skip
    out: list[Measurement] = []
    per_epoch = read_manifest(root).samples // sz.batch
    if (repeats + 1) * sz.steps > per_epoch:
        notes["caveat: feed"] = (
            f"warm-up + {repeats} x {sz.steps} steps outlast an epoch of {per_epoch} steps: the "
            "DALI figures include a per-epoch pipeline rebuild (raise --imagenet-copies)"
        )

    def timed(name, batches, step, baseline, params):
        run = e2e.timed_steps(batches, step, sz.steps)
        out.append(measure(name, run, items=items, repeats=repeats, baseline=baseline,
                           params={**params, "batch": sz.batch, "steps": sz.steps}))  # fmt: skip
        return out[-1]

    # Each timed() starts a fresh epoch; warm-up + repeats x steps fit inside it.
    dali_make, dali_close = e2e.loader_batches(
        LoaderConfig(data=root, backend=sz.feed_backend, **common)
    )
    # The other hand-over for photos: image by image, read in place from the shard files
    # (on a GPU the default is one shared-memory buffer per batch; which is faster there
    # is this figure's question). ResNet-18 only: the model that waits most on its feed.
    files = f"{sz.feed_backend}-files"
    files_make, files_close = e2e.loader_batches(
        LoaderConfig(data=root, backend=sz.feed_backend, hand_over="files", **common)
    )
    wds_batches = None
    wds_make = e2e.wds_batches(root, sz.batch, sz.image_size, num_workers=sz.workers,
                               resampled=True)  # fmt: skip
    try:
        feed_dali = timed(f"loader/{sz.feed_backend}", e2e.endless(dali_make), None,
                          "loader/wds-dataloader", {"what": "loader alone"})  # fmt: skip
        wds_batches = wds_make()  # one endless stream: the workers start once
        feed_wds = timed("loader/wds-dataloader", wds_batches, None, None,
                         {"what": "loader alone"})  # fmt: skip
        timed(f"loader/{files}", e2e.endless(files_make), None, f"loader/{sz.feed_backend}",
              {"what": "loader alone", "hand_over": "files"})  # fmt: skip
        for model in FEED_MODELS:
            print(f"-- feed: {model}", flush=True)
            step = e2e.trainer(model, num_classes, False, device)
            synth_make, synth_close = e2e.loader_batches(
                LoaderConfig(backend="synthetic", num_classes=num_classes,
                             synthetic_samples=items * (repeats + 1), **common)
            )  # fmt: skip
            ceiling = timed(f"train/synthetic/{model}", e2e.endless(synth_make), step, None,
                            {"model": model})  # fmt: skip
            synth_close()
            fed = timed(f"train/{sz.feed_backend}/{model}", e2e.endless(dali_make), step,
                        ceiling.name, {"model": model})  # fmt: skip
            base = timed(f"train/wds-dataloader/{model}", wds_batches, step, ceiling.name,
                         {"model": model})  # fmt: skip
            if model == "resnet18":
                timed(f"train/{files}/{model}", e2e.endless(files_make), step, ceiling.name,
                      {"model": model, "hand_over": "files"})  # fmt: skip
            for m, feed in ((fed, feed_dali), (base, feed_wds)):
                limit = "data feed" if feed.median < ceiling.median else "compute"
                notes[f"bottleneck {m.name}"] = (
                    f"{limit}: loader alone {feed.median:,.0f} img/s vs training step alone "
                    f"{ceiling.median:,.0f} img/s; fed {m.median:,.0f} img/s = feed ratio "
                    f"{m.median / ceiling.median:.2f}"
                )
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        dali_close()
        files_close()
        del wds_batches  # ends the DataLoader's worker processes
    return out


# -- part 3: decode throughput vs hw_decoder_load --------------------------------
def _decode_run(root: str, sz: Sizes, load: float):
    """DALI's webdataset reader + the loader's ImageNet train graph, HW_DECODER_LOAD set."""
    from nvidia.dali import Pipeline, fn

    from pipeline import LoaderConfig
    from pipeline.dali_graph import build_graph

    cfg = LoaderConfig(
        data=root, batch_size=sz.batch, image_size=sz.image_size, hw_decoder_load=load
    )
    gpu = sz.device == "cuda"
    tars = sorted(str(p) for p in Path(root).glob("shard-*.tar"))
    pipe = Pipeline(batch_size=sz.batch, num_threads=sz.workers, device_id=0 if gpu else None,
                    seed=0, prefetch_queue_depth=2)  # fmt: skip
    with pipe:
        jpg, _cls = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                          ext=["jpg", "cls"], random_shuffle=True,
                                          initial_fill=1024, name="reader",
                                          missing_component_behavior="error")  # fmt: skip
        # The loader's own train graph (recipe "imagenet"), with the decoder split set.
        images = build_graph(jpg, cfg, "gpu" if gpu else "cpu")
        pipe.set_outputs(images)
    pipe.build()

    def run() -> int:
        for _ in range(sz.decode_steps):
            pipe.run()
        if gpu:
            torch.cuda.synchronize()  # DALI works on its own stream
        return sz.decode_steps * sz.batch

    return pipe, run


def _decode(root: str, sz: Sizes, repeats: int, notes: dict) -> list[Measurement]:
    out: list[Measurement] = []
    backend = "mixed" if sz.device == "cuda" else "cpu"
    if backend == "cpu":
        notes["decode"] = "dry run: DALI's CPU decoder, where hw_decoder_load has no effect"
    base = None
    for load in HW_DECODER_LOADS:
        pipe, run = _decode_run(root, sz, load)
        name = f"decode/{backend}/hw_decoder_load={load:g}"
        out.append(measure(name, run, items=sz.decode_steps * sz.batch, repeats=repeats, baseline=base,
                           params={"hw_decoder_load": load, "batch": sz.batch,
                                   "threads": sz.workers}))  # fmt: skip
        base = base or name
        del pipe
    return out


# -- part 4: CIFAR-10 time to target ---------------------------------------------
def _cifar(roots: dict, sz: Sizes, target: float, work: Path, notes: dict) -> Measurement:
    from train import distributed
    from train.config import parse_args
    from train.evaluate import evaluate
    from train.loop import run_epoch
    from train.trainer import build

    epochs = sz.cifar_epochs
    argv = [*CIFAR_FLAGS, "--data", roots["cifar-train"], "--val-data", roots["cifar-test"],
            "--batch-size", str(sz.cifar_batch), "--epochs", str(epochs),
            "--warmup-epochs", str(epochs / 5), "--device", sz.device,
            "--out", str(work / "cifar-run"), "--log-every-steps", "1000000"]  # fmt: skip
    cfg = parse_args(argv, prog="python -m benchmarks gpu")
    d = distributed.setup(device=sz.device)
    run = None
    curve: list[tuple[int, float, float]] = []  # (epoch, top1, seconds since start)
    images = 0
    try:
        t0 = time.perf_counter()
        run = build(cfg, d)
        st, s = run.state, run.settings
        for epoch in range(epochs):
            run.loader.set_epoch(epoch)
            steps = len(run.loader)
            run_epoch(st, run.loader, s, steps=steps, world_size=1, log_every=10**9,
                      on_log=lambda _r: None, after_step=lambda: None, audit=run.audit)  # fmt: skip
            st.epoch += 1
            images += steps * sz.cifar_batch
            top1 = evaluate(st.model, run.val_loader, device=s.device, amp_dtype=s.amp_dtype,
                            channels_last=s.channels_last)["top1"]  # fmt: skip
            curve.append((epoch + 1, top1, time.perf_counter() - t0))
            print(f"  cifar10/cifar_fast: epoch {epoch + 1} top-1 {100 * top1:.2f}% "
                  f"at {curve[-1][2]:.1f} s", flush=True)  # fmt: skip
            if top1 >= target:
                break
    finally:
        if run is not None:
            run.close()
        distributed.teardown()
    epoch, top1, wall = curve[-1]
    reached = top1 >= target
    name = f"cifar10/cifar_fast/time-to-{100 * target:g}%"
    notes[name] = (
        f"{'reached' if reached else 'NOT reached'}: {100 * top1:.2f}% test top-1 after "
        f"{epoch} epoch(s), {wall:.1f} s from build (device-cache fill and evaluations "
        f"included; cap {epochs} epochs)"
    )
    notes["cifar10 curve (epoch, top-1 %, s)"] = ", ".join(
        f"({e}, {100 * t:.2f}, {w:.1f})" for e, t, w in curve
    )
    return Measurement(
        name=name,
        unit="img/s",
        items=images,
        seconds=[wall],
        params={"reached": reached, "top1": top1, "epochs": epoch, "seconds": round(wall, 2),
                "epoch_cap": epochs, "batch": sz.cifar_batch, "flags": " ".join(CIFAR_FLAGS)},
    )  # fmt: skip


# -- the suite -------------------------------------------------------------------
def run(args) -> tuple[list[Measurement], dict]:
    if args.data:
        os.environ["SHARDFLOW_SHARED_DATA"] = str(Path(args.data).resolve())
    preflight(args)
    sz = sizes_for(args)
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"feed", "decode", "cifar"}:
        raise SystemExit(f"gpu: --skip takes feed,decode,cifar; got {args.skip!r}")
    repeats = args.repeats
    if sz.device == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        # The dry run checks the flow, not speed: one timed window each, and one torch
        # thread (two spinning OpenMP threads on a busy 2-core machine run ~20x slower).
        repeats = 1
        torch.set_num_threads(1)
    notes: dict = {
        "mode": "DRY RUN on CPU (tiny sizes; figures mean nothing)" if args.dry_run else "GPU",
        "device": torch.cuda.get_device_name(0) if sz.device == "cuda" else "cpu",
        "setup": f"{sz.image_size} px, batch {sz.batch}, {sz.steps} steps per timed window, "
        f"{sz.workers} DataLoader workers / DALI threads / pack workers",
    }
    t_start = time.perf_counter()
    out: list[Measurement] = []
    with data.work_dir(args.work_dir, "gpu-suite") as work:
        roots = _prepare(work, sz, notes)
        for part, fn_ in (("feed", _feed), ("decode", _decode)):
            if part not in skip:
                print(f"-- {part}", flush=True)
                t = time.perf_counter()
                out += fn_(roots["imagenet"], sz, repeats, notes)
                notes[f"seconds: {part}"] = round(time.perf_counter() - t, 1)
        if "cifar" not in skip:
            print("-- cifar10 time to target", flush=True)
            t = time.perf_counter()
            out.append(_cifar(roots, sz, args.target, work, notes))
            notes["seconds: cifar"] = round(time.perf_counter() - t, 1)
    notes["seconds: total"] = round(time.perf_counter() - t_start, 1)
    return out, notes


def final_table(measurements: list[Measurement], notes: dict) -> str:
    """The summary printed last: feed ratios, decode rates, CIFAR-10 time to target."""
    by = {m.name: m for m in measurements}
    lines = [
        f"### GPU suite summary ({notes.get('device')}; {notes.get('mode')})",
        "",
        "| what | img/s (median) | ratio | note |",
        "| --- | ---: | ---: | --- |",
    ]
    for m in measurements:
        if m.name.startswith("cifar10/"):
            p = m.params
            lines.append(
                f"| {m.name} | {m.median:,.0f} | - | {'reached' if p['reached'] else 'not reached'}"
                f": {100 * p['top1']:.2f}% after {p['epochs']} epochs, {p['seconds']:.1f} s |"
            )
            continue
        base = by.get(m.baseline) if m.baseline else None
        ratio = f"{m.median / base.median:.2f}" if base and base.median > 0 else "-"
        if m.name.startswith("train/") and base:
            note = "feed ratio (fed / synthetic)"
        elif m.name.startswith("train/"):
            note = "ceiling"
        elif base:
            note = f"vs {base.name}"
        else:
            note = ""
        lines.append(f"| {m.name} | {m.median:,.0f} | {ratio} | {note} |")
    bottlenecks = [f"- {k}: {v}" for k, v in notes.items() if k.startswith("bottleneck ")]
    return "\n".join(lines + [""] + bottlenecks) + "\n"
