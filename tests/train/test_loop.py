"""The training step: gradient accumulation is the same update as one big batch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from train.loop import StepSettings, TrainState, train_step
from train.models import build_model
from train.optim import loss_fn


def _state(channels_last: bool) -> TrainState:
    torch.manual_seed(0)
    model = build_model("seed_cnn", 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    return TrainState(
        model=model,
        runner=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        ema=None,
    )


def _settings(accum: int, channels_last: bool) -> StepSettings:
    return StepSettings(device=torch.device("cpu"), amp_dtype=None, channels_last=channels_last,
                        grad_accum=accum, grad_clip_norm=0.0, criterion=loss_fn(0.1))  # fmt: skip


def test_accumulated_micro_batches_equal_one_batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    whole, split = _state(False), _state(True)
    for _ in range(3):
        loss_a = train_step(
            whole, [SimpleNamespace(images=images, labels=labels)], _settings(1, False)
        )
        micro = [
            SimpleNamespace(images=images[i : i + 4], labels=labels[i : i + 4])
            for i in range(0, 16, 4)
        ]
        loss_b = train_step(split, micro, _settings(4, True))
        assert torch.allclose(loss_a, loss_b, atol=1e-5)
    for (name, a), b in zip(
        whole.model.state_dict().items(), split.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5), name
    assert whole.scheduler.last_epoch == split.scheduler.last_epoch == 3
