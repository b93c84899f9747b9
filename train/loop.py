"""The training step and the epoch loop: precision, accumulation, timing, audit hooks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from train import distributed
from train.metrics import peak_memory_mb
from train.optim import EMA, clip_grads


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights again (momentum and weight decay would revive them)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


@dataclass(kw_only=True)
class TrainState:
    """Everything that changes while training; a checkpoint is a snapshot of it."""

    model: nn.Module  # the plain module (what is saved)
    runner: nn.Module  # what is called: DDP and/or torch.compile around MODEL
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: EMA | None
    step: int = 0  # optimizer steps done, all epochs
    epoch: int = 0  # the epoch in progress (or next to start)
    step_in_epoch: int = 0  # optimizer steps done in EPOCH
    # Pruning masks (param name -> keep mask), re-applied after every optimizer step.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    # Modules held in eval mode while training (BN of a frozen backbone).
    frozen_modules: list[nn.Module] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32
    channels_last: bool
    grad_accum: int
    grad_clip_norm: float
    criterion: nn.Module
    # Knowledge distillation: called as distiller(logits, images, labels) instead of CRITERION.
    distiller: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass(kw_only=True)
class Window:
    """Counters since the last metrics line."""

    images: int = 0
    wait_s: float = 0.0
    excluded_s: float = 0.0  # checkpoint/eval time inside the window: not training throughput
    t0: float = field(default_factory=time.perf_counter)
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0


def autocast(settings: StepSettings) -> contextlib.AbstractContextManager:
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.amp_dtype)


def prepare_images(images: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    images = images.to(settings.device, non_blocking=True)
    fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
    return images.contiguous(memory_format=fmt)


def train_step(state: TrainState, micro_batches: list[Any], settings: StepSettings) -> torch.Tensor:
    """One optimizer step over GRAD_ACCUM micro-batches; returns the mean loss (a tensor,
    so the caller decides when to pay for a device sync)."""
    state.runner.train()
    for m in state.frozen_modules:
        m.eval()
    total = torch.zeros((), device=settings.device)
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        # Only the last micro-batch all-reduces gradients; the others accumulate locally.
        sync = i == n - 1 or not hasattr(state.runner, "no_sync")
        ctx = contextlib.nullcontext() if sync else state.runner.no_sync()
        with ctx:
            images = prepare_images(batch.images, settings)
            labels = batch.labels.to(settings.device, non_blocking=True)
            with autocast(settings):
                logits = state.runner(images)
                if settings.distiller is None:
                    loss = settings.criterion(logits, labels) / n
                else:
                    loss = settings.distiller(logits, images, labels) / n
            state.scaler.scale(loss).backward()
        total += loss.detach()
    if settings.grad_clip_norm > 0:
        state.scaler.unscale_(state.optimizer)
        clip_grads(state.model.parameters(), settings.grad_clip_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.masks:
        apply_masks(state.model, state.masks)
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(state.model)
    return total


class KeyAudit:
    """Appends each step's sample keys to RUN_DIR/audit/keys-rankR.jsonl (debug aid for
    resume/sharding checks; local run dirs only)."""

    def __init__(self, run_dir: str, rank: int, enabled: bool) -> None:
        self.file = None
        if enabled:
            if "://" in run_dir:
                raise ValueError("--audit-keys writes local files; use a local --out")
            os.makedirs(os.path.join(run_dir, "audit"), exist_ok=True)
            self.file = open(os.path.join(run_dir, "audit", f"keys-rank{rank}.jsonl"), "a")  # noqa: SIM115

    def write(self, epoch: int, step: int, keys: list[str]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"epoch": epoch, "step": step, "keys": keys}) + "\n")
            self.file.flush()

    def write_final(self, model: nn.Module, step: int) -> None:
        """Record a digest of this rank's final weights (ranks of one job must agree)."""
        if self.file is None:
            return
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        path = self.file.name.replace("keys-rank", "final-rank").replace(".jsonl", ".json")
        with open(path, "w") as f:
            json.dump({"step": step, "weights_sha256": digest.hexdigest()}, f)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def next_micro_batches(it: Iterator[Any], count: int) -> list[Any]:
    return [next(it) for _ in range(count)]


def window_record(window: Window, settings: StepSettings, world_size: int) -> dict[str, float]:
    """Reduce the window's counters over ranks (one collective) into rates and fractions."""
    if settings.device.type == "cuda":
        torch.cuda.synchronize(settings.device)
    elapsed = time.perf_counter() - window.t0 - window.excluded_s
    loss = (
        window.loss_sum.item() / max(1, window.loss_count)
        if window.loss_sum is not None
        else float("nan")
    )
    images, wait_s, loss_sum = distributed.all_reduce_sum(
        [window.images, window.wait_s, loss], settings.device
    )
    (max_elapsed,) = distributed.all_reduce_max([elapsed], settings.device)
    return {
        "loss": loss_sum / world_size,
        "img_per_s": images / max(max_elapsed, 1e-9),
        "img_per_s_per_rank": window.images / max(elapsed, 1e-9),
        "data_wait_frac": wait_s / world_size / max(max_elapsed, 1e-9),
        "peak_mem_mb": peak_memory_mb(settings.device),
    }


def run_epoch(
    state: TrainState,
    loader: Any,
    settings: StepSettings,
    *,
    steps: int,
    world_size: int,
    log_every: int,
    on_log: Callable[[dict[str, float]], None],
    after_step: Callable[[], None],
    audit: KeyAudit,
) -> None:
    """Run STEPS optimizer steps of the current epoch from the loader's position.

    ON_LOG gets the reduced window every LOG_EVERY global steps and after the last;
    AFTER_STEP (checkpoints, evaluation) runs after every step, and its time is
    kept out of the throughput figures.
    """
    it = iter(loader)
    window = Window()
    for i in range(steps):
        t = time.perf_counter()
        micro = next_micro_batches(it, settings.grad_accum)
        window.wait_s += time.perf_counter() - t
        loss = train_step(state, micro, settings)
        state.step += 1
        state.step_in_epoch += 1
        window.images += sum(len(b) for b in micro)
        window.loss_sum = loss if window.loss_sum is None else window.loss_sum + loss
        window.loss_count += 1
        audit.write(state.epoch, state.step, [k for b in micro for k in b.keys])
        if state.step % log_every == 0 or i == steps - 1:
            on_log(window_record(window, settings, world_size))
            window = Window()
        t = time.perf_counter()
        after_step()
        window.excluded_s += time.perf_counter() - t
    # An iterator left unexhausted (max steps, grad-accum remainder) is fine: the loader
    # keeps its position for state_dict() and re-plans on set_epoch.
    del it
