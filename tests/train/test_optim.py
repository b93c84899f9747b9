"""Optimizer groups, lr schedules and the weight EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from train.config import OptimConfig
from train.models import build_model
from train.optim import EMA, build_optimizer, build_scheduler, lr_factor, param_groups


def test_no_weight_decay_on_norms_and_biases():
    m = build_model("resnet18", 10)
    groups = param_groups(m, 5e-4)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in m.named_parameters():
        is_weight = p.ndim >= 2
        assert (id(p) in decayed) == is_weight, name
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_lr_multiplier_groups_and_frozen_params():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    m[0].weight.requires_grad_(False)
    groups = param_groups(m, 0.1, lr_mult_of={id(m[1].weight): 10.0})
    opt = build_optimizer(groups, OptimConfig(lr=0.01))
    lrs = sorted((g["lr"], len(g["params"])) for g in opt.param_groups)
    assert lrs == [(0.01, 2), (0.1, 1)]  # frozen weight left out; head weight at 10x


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedule_shapes(schedule):
    f = lambda s: lr_factor(s, total_steps=100, warmup_steps=10, schedule=schedule, min_ratio=0.0)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    mid = 0.5 if schedule == "onecycle" else 0.5 * (1 + math.cos(math.pi * 0.5))
    assert f(55) == pytest.approx(mid)
    assert f(100) == pytest.approx(0.0)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_scheduler_drives_optimizer_and_state_is_plain():
    m = nn.Linear(2, 2)
    cfg = OptimConfig(lr=0.5, schedule="cosine", warmup_epochs=1.0, min_lr_ratio=0.1)
    opt = build_optimizer(param_groups(m, 0.0), cfg)
    sched = build_scheduler(opt, cfg, total_steps=20, steps_per_epoch=5)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.1) and seen[4] == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    torch.save(sched.state_dict(), "/dev/null")  # nothing unpicklable inside
    assert all(
        v is None or isinstance(v, int | float | bool | list) for v in sched.state_dict().values()
    )


def test_ema_math_and_round_trip():
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)
    ema.update(m)
    assert ema.shadow["weight"].item() == pytest.approx(1 - 0.9**2)
    other = EMA(m, decay=0.9)
    other.load_state_dict(ema.state_dict())
    target = nn.Linear(1, 1, bias=False)
    other.copy_to(target)
    assert target.weight.item() == pytest.approx(0.19)
