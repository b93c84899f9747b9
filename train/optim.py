"""Optimizer, learning-rate schedule, loss and weight EMA."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from train.config import OptimConfig


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    lr_mult_of: dict[int, float] | None = None,
) -> list[dict]:
    """Split parameters into groups: weight decay only on weights of convs/linears.

    Norm scales and biases (every parameter with fewer than 2 dims) get no decay:
    decaying them only fights the normalisation. LR_MULT_OF maps id(param) to an
    lr multiplier (e.g. a smaller one for a pre-trained backbone); frozen
    parameters (requires_grad False) are left out.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = (p.ndim >= 2, (lr_mult_of or {}).get(id(p), 1.0))
        groups.setdefault(key, []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult}
        for (decay, mult), ps in sorted(groups.items(), key=lambda kv: kv[0])
    ]


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float
) -> float:
    """Multiplier of the peak lr for optimizer step STEP (0-based), a pure function.

    Linear warm-up from ~0 to 1, then: cosine to MIN_RATIO, a linear ramp down
    (one-cycle) to MIN_RATIO, or constant.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * t))
    else:  # onecycle: the peak is reached at the end of warm-up, then a straight line down
        shape = 1.0 - t
    return min_ratio + (1 - min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over lr_factor; its state_dict holds only numbers (safe to checkpoint)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and warmup == 0:
        # One-cycle without a ramp up is just a linear decay; give it the usual 25%.
        warmup = max(1, total_steps // 4)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            total_steps=total_steps,
            warmup_steps=warmup,
            schedule=cfg.schedule,
            min_ratio=cfg.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of a model's floating-point state (weights and BN stats)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)


def loss_fn(label_smoothing: float) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def clip_grads(params: Iterable[nn.Parameter], max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm)
