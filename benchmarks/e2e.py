"""e2e: does the GPU (or CPU) wait for data? Training fed by each loader, in one process.

For each (dataset, model) pair, in one run:

* ``train-step/synthetic``: the model trained on the same on-device tensors
  every step -- the ceiling (compute-bound speed);
* ``loader-only/<backend>``: the loader iterated with no model -- the feed rate;
* ``train/<backend>``: the model trained on the loader's batches -- the real
  speed. Its ratio to the ceiling is the *feed ratio*: 1.0 means the model
  never waits for data;
* ``train/wds-dataloader``: the same model fed by plain webdataset +
  DataLoader + PIL, what most users run.

The notes name the limiting stage per pair (feed or compute, and by how much)
and an img/s-over-time trace of one fed run is plotted next to the results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from benchmarks import data
from benchmarks.harness import Measurement, environment, measure, result_stem

WORKERS = 2


def add_arguments(parser) -> None:
    data.add_work_dir_argument(parser)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repetition")
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated loader backends (default: dali-cpu,torch; dali-gpu too on a GPU)",
    )
    parser.add_argument("--only", default=None, help="datasets: imagenet,cifar (default: both)")
    parser.add_argument("--cifar-limit", type=int, default=None, help="CIFAR-10 images to pack")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def trainer(model_name: str, num_classes: int, cifar_stem: bool, device: torch.device):
    """A plain step function: forward, loss, backward, SGD step (bf16 autocast on GPU)."""
    from train.models import build_model

    model = build_model(model_name, num_classes, cifar_stem=cifar_stem).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = device.type == "cuda"

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True) % num_classes
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(images.float() if not amp else images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def endless(make: Callable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from MAKE() epoch after epoch (a fresh iterator per epoch)."""
    while True:
        yield from make()


def loader_batches(cfg) -> tuple[Callable, Callable]:
    """(make, close) for the pipeline loader of CFG: each make() starts the next epoch."""
    from pipeline import World, build_loader

    loader = build_loader(cfg, World())
    epoch = {"n": 0}

    def make() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        loader.set_epoch(epoch["n"])
        epoch["n"] += 1
        return ((b.images, b.labels) for b in loader)

    return make, loader.close


def wds_batches(
    root: str, batch: int, image_size: int, *, num_workers: int = WORKERS, resampled: bool = False
) -> Callable:
    """make() for the webdataset + DataLoader + PIL baseline over ROOT's shards: one
    pass over them per call (endless with RESAMPLED: the workers start only once)."""
    from benchmarks.baselines import webdataset_loader

    urls = sorted(str(p) for p in Path(root).glob("shard-*.tar"))
    return lambda: webdataset_loader(
        urls,
        batch_size=batch,
        image_size=image_size,
        num_workers=num_workers,
        resampled=resampled,
    )


def timed_steps(batches: Iterator, step, steps: int, trace: list[float] | None = None):
    """A RUN callable for measure(): STEPS training steps over BATCHES; returns images."""

    def run() -> int:
        done = 0
        for _ in range(steps):
            images, labels = next(batches)
            if step is not None:
                step(images, labels)
            done += len(images)
            if trace is not None:
                trace.append(time.perf_counter())
        return done

    return run


def _pairs(args, work: Path) -> list[dict]:
    datasets = data.loader_datasets(
        work,
        quick=args.quick,
        only=args.only,
        cifar_limit=args.cifar_limit or (data.QUICK_CIFAR if args.quick else 10000),
        epochs=None,
        workers=WORKERS,
    )
    pairs = []
    for ds in datasets:
        if ds["name"] == "cifar":
            # --quick: the CIFAR-stem ResNet only in full runs (minutes on a CPU).
            models = [("seed_cnn", False)] + ([] if args.quick else [("resnet18", True)])
        else:
            models = [("resnet18", False)] + (
                [("resnet50", False)] if _device().type == "cuda" else []
            )
        for model, stem in models:
            pairs.append({**ds, "model": model, "cifar_stem": stem})
    return pairs


def _measure_pair(p: dict, args, notes: dict, traces: dict) -> list[Measurement]:
    from pipeline import LoaderConfig
    from shard_tools.format import read_manifest

    device = _device()
    tag = f"{p['name']}/{p['model']}"
    num_classes = read_manifest(p["root"]).num_classes
    steps = args.steps or (3 if args.quick else (20 if device.type == "cpu" else 200))
    if p["name"] == "imagenet" and device.type == "cpu" and not args.steps:
        steps = 2 if args.quick else 6  # a ResNet at 224 px trains at tens of img/s on 2 cores
    # --quick on a CPU: batches of 4, or the ResNets alone take minutes.
    batch = p["batch"] if device.type == "cuda" else min(p["batch"], 4 if args.quick else 64)
    items = steps * batch
    step = trainer(p["model"], num_classes, p["cifar_stem"], device)
    common = dict(batch_size=batch, image_size=p["image_size"], recipe=p["recipe"],
                  num_workers=WORKERS, num_threads=WORKERS, seed=0, device=str(device))  # fmt: skip
    backends = (args.backends or ("dali-gpu,dali-cpu,torch" if device.type == "cuda" else "dali-cpu,torch")).split(",")  # fmt: skip
    ceiling = f"train-step/synthetic/{tag}"
    out: list[Measurement] = []

    def timed(name, batches, step_fn, baseline=ceiling, trace=None):
        out.append(measure(name, timed_steps(batches, step_fn, steps, trace), items=items,
                           repeats=args.repeats, baseline=baseline))  # fmt: skip

    synth_make, synth_close = loader_batches(
        LoaderConfig(
            backend="synthetic", num_classes=num_classes, synthetic_samples=items, **common
        )
    )
    timed(ceiling, endless(synth_make), step, baseline=None)
    synth_close()
    feeds = {}
    for backend in backends:
        try:
            make, close = loader_batches(LoaderConfig(data=p["root"], backend=backend, **common))
        except (ImportError, ValueError, RuntimeError) as exc:
            notes[f"{tag}/{backend}"] = f"not measured: {exc}"
            continue
        timed(f"loader-only/{backend}/{tag}", endless(make), None)
        feeds[backend] = out[-1].median
        trace: list[float] = []
        timed(f"train/{backend}/{tag}", endless(make), step, trace=trace)
        traces[f"train/{backend}/{tag}"] = (trace, batch)
        close()
    timed(
        f"train/wds-dataloader/{tag}",
        endless(wds_batches(p["root"], batch, p["image_size"])),
        step,
    )
    compute = out[0].median
    for backend, feed in feeds.items():
        limit = "data feed" if feed < compute else "compute"
        notes[f"bottleneck {backend}/{tag}"] = (
            f"{limit}: loader alone {feed:,.0f} img/s vs train step alone {compute:,.0f} img/s "
            f"({min(feed, compute) / max(feed, compute):.2f}x)"
        )
    return out


def _trace_plot(traces: dict, out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, (stamps, batch) in traces.items():
        if len(stamps) < 3:
            continue
        t0 = stamps[0]
        rates = [batch / (b - a) for a, b in zip(stamps, stamps[1:], strict=False) if b > a]
        ax.plot([s - t0 for s in stamps[1 : len(rates) + 1]], rates, label=name, linewidth=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("img/s per step")
    ax.set_title("e2e: training img/s over time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Named like the suite's other outputs (what, where, when), plus what it shows.
    fig.savefig(out_dir / f"{result_stem('e2e', environment())}_img_per_s_over_time.png", dpi=100)
    plt.close(fig)


def run(args) -> tuple[list[Measurement], dict]:
    notes: dict = {
        "device": str(_device()),
        "setup": f"one process, {WORKERS} loader workers/threads",
    }
    traces: dict = {}
    with data.work_dir(args.work_dir, "e2e-bench") as work:
        out: list[Measurement] = []
        for p in _pairs(args, work):
            print(f"-- {p['name']} / {p['model']}", flush=True)
            out += _measure_pair(p, args, notes, traces)
    _trace_plot(traces, Path(getattr(args, "out", "benchmarks/results")))
    return out, notes
