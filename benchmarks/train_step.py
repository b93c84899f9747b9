"""train: training-step throughput of the trainer's own step on synthetic input.

One process, no data loading: random images already on the device, so the
figure is the model + optimizer ceiling that a loader has to keep up with.
Each configuration runs ``train.loop.train_step`` (SGD + nesterov, cross
entropy, the trainer's precision and memory-format handling) for --steps
steps per timed repetition; CUDA is synchronised by the harness.

Per model the baseline is the plain setting (fp32, contiguous NCHW, eager);
the others are shown as ratios to it: channels_last everywhere, plus bf16
autocast and (with --compile) torch.compile on a GPU.
On CPU: seed_cnn and resnet18 (CIFAR stem) at 32 px. On a GPU: also
resnet18/resnet50 at 224 px and cifar_fast at 32 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from benchmarks.harness import Measurement, measure


@dataclass(frozen=True)
class Case:
    model: str
    image_size: int
    batch: int
    cifar_stem: bool = True


def add_arguments(parser) -> None:
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per timed repetition (default: 20; 2 with --quick)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also measure torch.compile (slow to compile)"
    )
    parser.add_argument(
        "--models", default=None, help="comma-separated models to run (default: all for the device)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)"
    )


def cases(cuda: bool, quick: bool) -> list[Case]:
    if not cuda:
        if quick:
            return [Case("seed_cnn", 32, 64), Case("resnet18", 32, 4)]
        return [Case("seed_cnn", 32, 256), Case("resnet18", 32, 64)]
    if quick:
        return [Case("seed_cnn", 32, 512), Case("resnet18", 224, 32, cifar_stem=False)]
    return [
        Case("seed_cnn", 32, 1024),
        Case("cifar_fast", 32, 1024),
        Case("resnet18", 224, 256, cifar_stem=False),
        Case("resnet50", 224, 256, cifar_stem=False),
    ]


def _runner(case: Case, device: torch.device, *, channels_last: bool, amp: torch.dtype | None,
            compile_model: bool, steps: int):  # fmt: skip
    from train.loop import StepSettings, TrainState, train_step
    from train.models import build_model
    from train.optim import loss_fn

    torch.manual_seed(0)
    model = build_model(case.model, 10, cifar_stem=case.cifar_stem).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    runner = torch.compile(model) if compile_model else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    state = TrainState(
        model=model,
        runner=runner,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0),
        scaler=torch.amp.GradScaler(device.type, enabled=False),
        ema=None,
    )
    settings = StepSettings(
        device=device, amp_dtype=amp, channels_last=channels_last, grad_accum=1,
        grad_clip_norm=0.0, criterion=loss_fn(0.0),
    )  # fmt: skip
    shape = (case.batch, 3, case.image_size, case.image_size)
    batch = SimpleNamespace(
        images=torch.randn(shape, device=device).contiguous(memory_format=fmt),
        labels=torch.randint(0, 10, (case.batch,), device=device),
    )

    def run() -> None:
        loss = None
        for _ in range(steps):
            loss = train_step(state, [batch], settings)
        loss.item()  # the last step's result: every queued kernel has run

    return run


def run(args) -> tuple[list[Measurement], dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (2 if args.quick else 20)
    results: list[Measurement] = []
    wanted = set(args.models.split(",")) if args.models else None
    for case in cases(cuda, args.quick):
        if wanted and case.model not in wanted:
            continue
        base = f"{case.model}/{case.image_size}px/b{case.batch}"
        variants = [("fp32-nchw", False, None, False), ("fp32-channels_last", True, None, False)]
        if cuda:
            variants.append(("bf16-channels_last", True, torch.bfloat16, False))
            if args.compile:
                variants.append(("bf16-channels_last-compile", True, torch.bfloat16, True))
        elif args.compile:
            variants.append(("fp32-channels_last-compile", True, None, True))
        for label, channels_last, amp, compile_model in variants:
            fn = _runner(
                case,
                device,
                channels_last=channels_last,
                amp=amp,
                compile_model=compile_model,
                steps=steps,
            )
            results.append(
                measure(
                    f"{base}/{label}",
                    fn,
                    items=steps * case.batch,
                    repeats=args.repeats,
                    baseline=None if label == "fp32-nchw" else f"{base}/fp32-nchw",
                    params={
                        "model": case.model,
                        "image_size": case.image_size,
                        "batch": case.batch,
                        "steps": steps,
                        "device": str(device),
                        "channels_last": channels_last,
                        "amp": str(amp) if amp else "fp32",
                        "compile": compile_model,
                    },
                )  # fmt: skip
            )
    notes = {
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"cpu ({torch.get_num_threads()} torch threads)",
        "input": "synthetic random images already on the device (no loader)",
        "step": "train.loop.train_step: forward, cross entropy, backward, SGD nesterov, scheduler",
    }
    return results, notes
