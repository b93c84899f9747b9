"""Build a run from a Config (data, model, optimizer, resume) and train it."""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from train import checkpoint, distributed, transfer
from train.config import Config, with_overrides
from train.data import check_same_classes, dataset_classes, loader_config, make_loader
from train.distill import Distiller, load_teacher
from train.distributed import Dist
from train.evaluate import evaluate
from train.faults import KillAt
from train.loop import KeyAudit, StepSettings, TrainState, run_epoch
from train.metrics import MetricsLog, environment, format_eval, format_step
from train.models import resolve_image_size
from train.optim import EMA, build_optimizer, build_scheduler, loss_fn, param_groups
from train.state import device_masks, load_parts, rank_seed, run_parts, save_parts


@dataclass(kw_only=True)
class Run:
    cfg: Config  # resolved: num_classes and image_size filled in
    dist: Dist
    loader: Any
    val_loader: Any | None
    state: TrainState
    settings: StepSettings
    steps_per_epoch: int
    total_steps: int
    classes: dict[str, int] | None  # the training data's name -> label map (None: synthetic)
    log: MetricsLog
    audit: KeyAudit
    evals: list[dict[str, Any]] = field(default_factory=list)
    kill_at: KillAt | None = None  # test-only fault injection (train.faults)
    last_saved_step: int = -1
    train_s: float = 0.0
    images: int = 0

    def close(self) -> None:
        for loader in (self.loader, self.val_loader):
            if loader is not None:
                loader.close()
        self.audit.close()
        self.log.close()


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU and fp32 on CPU unless asked otherwise."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a GPU (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def set_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        # cuBLAS needs this before its first call to pick deterministic reductions.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_classes(cfg: Config) -> tuple[int, dict[str, int] | None]:
    """Class count (and name -> label map) from the manifest(s), checked against
    --num-classes and the validation data."""
    if not cfg.data.data:
        return cfg.model.num_classes, None
    classes = dataset_classes(cfg.data.data)
    n = len(classes)
    if cfg.model.num_classes and cfg.model.num_classes != n:
        raise ValueError(
            f"--num-classes {cfg.model.num_classes} disagrees with the {n} classes of {cfg.data.data}"
        )
    if cfg.data.val_data:
        check_same_classes(
            classes,
            f"the training data {cfg.data.data}",
            dataset_classes(cfg.data.val_data),
            cfg.data.val_data,
        )
    return n, classes


def build(cfg: Config, d: Dist) -> Run:
    """Everything a run needs, resumed from a checkpoint if asked to."""
    if cfg.run.deterministic:
        set_deterministic(d.device)
    elif d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.data.backend == "dali-gpu" and d.device.type != "cuda":
        raise ValueError("--backend dali-gpu needs a GPU; use dali-cpu or torch on CPU")
    num_classes, classes = resolve_classes(cfg)
    image_size = resolve_image_size(cfg.model.model, cfg.data.image_size, cfg.model.cifar_stem)
    cfg = with_overrides(cfg, model={"num_classes": num_classes}, data={"image_size": image_size})
    loader, val_loader = _build_loaders(cfg, d)
    steps_per_epoch = len(loader) // cfg.run.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.data.data or 'the synthetic data'} gives {len(loader)} batches per rank, fewer than "
            f"--grad-accum {cfg.run.grad_accum}: lower --batch-size"
        )
    total = steps_per_epoch * cfg.run.epochs
    if cfg.run.max_steps:
        total = min(total, cfg.run.max_steps)
    state = _build_train_state(cfg, d, total_steps=total, steps_per_epoch=steps_per_epoch)
    settings = _step_settings(cfg, d)
    # Per-rank streams for anything random during training (none of the built-in models
    # use any, but dropout in a user's model should differ across ranks).
    torch.manual_seed(rank_seed(cfg.run.seed, d.rank))
    run = Run(
        cfg=cfg,
        dist=d,
        loader=loader,
        val_loader=val_loader,
        state=state,
        settings=settings,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        classes=classes,
        log=MetricsLog(cfg.run.out, enabled=d.is_main, tensorboard=cfg.run.tensorboard),
        audit=KeyAudit(cfg.run.out, d.rank, cfg.run.audit_keys),
        kill_at=KillAt.from_env(),
    )
    if cfg.run.resume:
        resume(run)
    return run


def _build_loaders(cfg: Config, d: Dist) -> tuple[Any, Any | None]:
    """The training loader and, with --val-data, the evaluation loader."""
    per_rank = cfg.per_rank_batch(d.world_size)
    common = dict(image_size=cfg.data.image_size, seed=cfg.run.seed, device=d.device,
                  num_classes=cfg.model.num_classes)  # fmt: skip
    loader = make_loader(
        loader_config(cfg.data, url=cfg.data.data, train=True, per_rank_batch=per_rank, **common),
        d.world,
    )
    val_loader = None
    if cfg.data.val_data:
        val_loader = make_loader(
            loader_config(cfg.data, url=cfg.data.val_data, train=False,
                          per_rank_batch=per_rank * cfg.run.grad_accum, **common),
            d.world,
        )  # fmt: skip
    return loader, val_loader


def _build_model(cfg: Config, d: Dist) -> tuple[nn.Module, transfer.TransferPlan, dict]:
    """The model on its device (initial weights equal on every rank), its transfer plan
    and the pruning masks it keeps."""
    seed_all(cfg.run.seed)  # identical initial weights on every rank
    m = cfg.model
    source = transfer.read_source(m.init_from, m.model) if m.init_from else None
    model = transfer.build_for(source, m.model, m.num_classes, cifar_stem=m.cifar_stem)
    plan = transfer.TransferPlan(lr_mult_of={}, frozen_modules=[])
    masks: dict[str, torch.Tensor] = {}
    if source is not None:
        transfer.load_backbone(model, m.model, source)
        plan = transfer.prepare(model, m.model, m.transfer, m.backbone_lr_mult, m.head_lr_mult)
        if m.keep_masks:
            if not source.masks:
                raise ValueError(f"--keep-masks: {m.init_from} stores no pruning masks")
            masks = source.masks
    model = model.to(d.device)
    masks = device_masks(model, masks, m.init_from)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, plan, masks


def _build_train_state(
    cfg: Config, d: Dist, *, total_steps: int, steps_per_epoch: int
) -> TrainState:
    model, plan, masks = _build_model(cfg, d)
    runner: nn.Module = model
    if d.world_size > 1:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        runner = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    if cfg.model.compile:
        runner = torch.compile(runner)
    optimizer = build_optimizer(
        param_groups(model, cfg.optim.weight_decay, lr_mult_of=plan.lr_mult_of), cfg.optim
    )
    scheduler = build_scheduler(
        optimizer, cfg.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch
    )
    amp = amp_dtype(cfg.run.precision, d.device)
    return TrainState(
        model=model,
        runner=runner,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(d.device.type, enabled=amp == torch.float16),
        ema=EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None,
        masks=masks,
        frozen_modules=plan.frozen_modules,
    )


def _step_settings(cfg: Config, d: Dist) -> StepSettings:
    criterion = loss_fn(cfg.optim.label_smoothing)
    distiller = None
    if cfg.optim.teacher:
        teacher = load_teacher(cfg.optim.teacher, num_classes=cfg.model.num_classes,
                               device=d.device, channels_last=cfg.model.channels_last)  # fmt: skip
        distiller = Distiller(teacher, criterion, alpha=cfg.optim.kd_alpha,
                              temperature=cfg.optim.kd_temperature)  # fmt: skip
    return StepSettings(
        device=d.device,
        amp_dtype=amp_dtype(cfg.run.precision, d.device),
        channels_last=cfg.model.channels_last,
        grad_accum=cfg.run.grad_accum,
        grad_clip_norm=cfg.optim.grad_clip_norm,
        criterion=criterion,
        distiller=distiller,
    )


def resume(run: Run) -> None:
    """Restore every part of the run's state from --resume (auto: newest complete one)."""
    cfg = run.cfg
    found: dict[str, Any] = {}  # rank 0's checkpoint, read while choosing it

    def choose() -> str | None:
        if cfg.run.resume != "auto":
            return cfg.run.resume
        latest = checkpoint.load_latest(cfg.run.out)
        if latest is None:
            return None
        found[latest[0]] = latest[1]
        return latest[0]

    # Every rank resumes from the checkpoint rank 0 chose, even where its own node lists
    # other files or none (a node-local --out); a rank that cannot read it gets rank 0's copy.
    url = distributed.decided_by_rank0(choose)
    if url is None:
        run.log.event(
            "resume", {"checkpoint": None}, "resume auto: no checkpoint yet, starting fresh"
        )
        return
    saved = distributed.read_everywhere(lambda: found.pop(url, None) or checkpoint.load(url))
    _check_resumable(run, url, saved)
    load_parts(run_parts(run), saved, url)
    st = run.state
    run.last_saved_step = st.step
    run.log.event("resume", {"checkpoint": url, "step": st.step, "epoch": st.epoch},
                  f"resumed from {url} at epoch {st.epoch} step {st.step}")  # fmt: skip


def _check_resumable(run: Run, url: str, saved: dict[str, Any]) -> None:
    """Refuse a checkpoint of another trainer, model or label space."""
    cfg = run.cfg
    meta = saved.get("meta") or {}
    if saved.get("format") != checkpoint.FORMAT or "optimizer" not in saved:
        raise checkpoint.CheckpointError(f"{url} is not a training checkpoint of this trainer")
    if meta.get("model") != cfg.model.model:
        raise ValueError(f"{url} holds a {meta.get('model')} model, not --model {cfg.model.model}")
    if meta.get("num_classes") != cfg.model.num_classes:
        raise ValueError(
            f"{url} was trained for {meta.get('num_classes')} classes but the data has {cfg.model.num_classes}"
        )
    if meta.get("classes") and run.classes:
        check_same_classes(meta["classes"], url, run.classes, cfg.data.data)


def save(run: Run) -> None:
    """Checkpoint the current state (a collective: RNG states come from every rank)."""
    st, d, cfg = run.state, run.dist, run.cfg
    parts = save_parts(run_parts(run))  # the loader's position is global: equal on every rank
    run.last_saved_step = st.step
    if not d.is_main:
        return
    payload = {
        "format": checkpoint.FORMAT,
        "meta": {
            "model": cfg.model.model,
            "num_classes": cfg.model.num_classes,
            "cifar_stem": cfg.model.cifar_stem,
            "image_size": cfg.data.image_size,
            "channels_last": cfg.model.channels_last,
            "world_size": d.world_size,
            "classes": run.classes,
            "widths": getattr(st.model, "widths", None),  # channel-pruned architecture
        },
        "config": cfg.to_dict(),
        **parts,
    }
    url = checkpoint.save(cfg.run.out, payload, st.step, keep=cfg.run.keep_checkpoints)
    run.log.event("checkpoint", {"step": st.step, "epoch": st.epoch, "url": url})
    run.log.flush()  # a remote metrics.jsonl then holds at least what a resume starts from


def run_eval(run: Run) -> None:
    st, s = run.state, run.settings
    kw = dict(device=s.device, amp_dtype=s.amp_dtype, channels_last=s.channels_last)
    # Epochs as a fraction (steps done / steps per epoch): evaluations at any step share one axis.
    result: dict[str, Any] = {
        "epoch": round(st.step / run.steps_per_epoch, 3),
        "step": st.step,
        **evaluate(st.model, run.val_loader, **kw),
    }
    if st.ema is not None:
        shadow = copy.deepcopy(st.model)
        st.ema.copy_to(shadow)
        result["ema_top1"] = evaluate(shadow, run.val_loader, **kw)["top1"]
    run.evals.append(result)
    run.log.event("eval", result, format_eval(result))
    run.log.flush()


def _epoch_done(run: Run) -> bool:
    # Fewer micro-batches left than one optimizer step takes: the rest is skipped.
    return run.loader.epoch_steps - run.loader.step < run.settings.grad_accum


def _after_step(run: Run) -> None:
    st, rc = run.state, run.cfg.run
    if not _epoch_done(run):  # the epoch end checkpoints and evaluates by itself
        if rc.ckpt_every_steps and st.step % rc.ckpt_every_steps == 0:
            save(run)
        if (
            run.val_loader is not None
            and rc.eval_every_steps
            and st.step % rc.eval_every_steps == 0
        ):
            run_eval(run)
    if run.kill_at is not None:
        run.kill_at.after_step(st.step, run.dist.rank)


def _log_step(run: Run, record: dict[str, float]) -> None:
    st = run.state
    record = {"step": st.step, "epoch": st.epoch, "total_steps": run.total_steps,
              "lr": st.optimizer.param_groups[0]["lr"], **record}  # fmt: skip
    run.log.event("train", record, format_step(record))


def _end_epoch(run: Run) -> None:
    st, rc, d = run.state, run.cfg.run, run.dist
    report = run.loader.epoch_report()
    seen, repeated, corrupt, steps, retries = distributed.all_reduce_sum(
        [report.samples, report.repeated, len(report.corrupt), report.steps, report.retries],
        d.device,
    )
    run.log.event(
        "epoch",
        {"epoch": st.epoch, "step": st.step, "samples_seen": int(seen), "repeated": int(repeated),
         "dropped": report.dropped, "corrupt": int(corrupt), "rank_steps": int(steps),
         "read_retries": int(retries)},
        f"epoch {st.epoch} done: {int(seen):,} samples over {d.world_size} rank(s) "
        f"({int(repeated)} pad repeats, {report.dropped} dropped, {int(corrupt)} corrupt, "
        f"{int(retries)} read retries)",
    )  # fmt: skip
    finished = st.epoch
    st.epoch += 1
    st.step_in_epoch = 0
    save(run)
    last = st.epoch == rc.epochs or st.step == run.total_steps
    cadence = rc.eval_every_epochs and (finished + 1) % rc.eval_every_epochs == 0
    on_step = rc.eval_every_steps and st.step % rc.eval_every_steps == 0
    if run.val_loader is not None and (cadence or on_step or last):
        run_eval(run)


def train(run: Run) -> dict[str, Any]:
    """Train to the end of the configured epochs or steps; returns the summary record."""
    cfg, st, d = run.cfg, run.state, run.dist
    if d.is_main:
        cfg.write_json(cfg.run.out.rstrip("/") + "/config.json")
    env = environment(d.device, d.world_size, d.backend)
    derived = {"per_rank_batch": cfg.per_rank_batch(d.world_size), "steps_per_epoch": run.steps_per_epoch,
               "total_steps": run.total_steps, "num_classes": cfg.model.num_classes,
               "image_size": cfg.data.image_size, "seed": cfg.run.seed}  # fmt: skip
    # What the loader decided where the config said "auto" (None): threads, prefetch and
    # reads come from the cores per local rank, so a run's record says what it ran with.
    lc = getattr(run.loader, "cfg", None)
    if lc is not None:
        derived["loader"] = {k: getattr(lc, k) for k in ("backend", "num_threads", "prefetch",
                             "read_ahead", "reader", "hand_over", "max_read_mb",
                             "hw_decoder_load")}  # fmt: skip
    run.log.event(
        "start", {"environment": env, **derived},
        f"train: {cfg.model.model} on {cfg.data.data or 'synthetic data'} ({cfg.data.backend}), "
        f"{d.world_size} rank(s) on {env['device']} [{d.backend}], batch {cfg.run.batch_size} "
        f"({derived['per_rank_batch']}/rank x {cfg.run.grad_accum}), {run.total_steps} steps | "
        f"torch {env['torch']}, dali {env['dali']}, git {env['git_sha']}",
    )  # fmt: skip
    t_start = time.perf_counter()
    while st.epoch < cfg.run.epochs and st.step < run.total_steps:
        run.loader.set_epoch(st.epoch)
        steps = min(len(run.loader) // cfg.run.grad_accum, run.total_steps - st.step)
        t = time.perf_counter()
        run_epoch(
            st, run.loader, run.settings, steps=steps, world_size=d.world_size,
            log_every=cfg.run.log_every_steps, on_log=lambda r: _log_step(run, r),
            after_step=lambda: _after_step(run), audit=run.audit,
        )  # fmt: skip
        run.train_s += time.perf_counter() - t
        run.images += steps * cfg.run.batch_size
        if _epoch_done(run):
            _end_epoch(run)
    if st.step != run.last_saved_step:
        save(run)
    run.audit.write_final(st.model, st.step)
    if run.val_loader is not None and (not run.evals or run.evals[-1]["step"] != st.step):
        run_eval(run)
    return summarize(run, time.perf_counter() - t_start)


def summarize(run: Run, wall_s: float) -> dict[str, Any]:
    st = run.state
    summary: dict[str, Any] = {"step": st.step, "epoch": st.epoch, "wall_s": round(wall_s, 2),
                               "train_img_per_s": run.images / run.train_s if run.train_s else 0.0}  # fmt: skip
    if run.evals:
        summary["top1"] = run.evals[-1]["top1"]
        summary["best_top1"] = max(e["top1"] for e in run.evals)
    acc = (
        f" top1 {100 * summary['top1']:.2f}% (best {100 * summary['best_top1']:.2f}%),"
        if run.evals
        else ""
    )
    run.log.event(
        "summary", summary,
        f"train: done: {st.step} steps, {st.epoch} epochs,{acc} {summary['train_img_per_s']:,.0f} img/s "
        f"(global, training time only), {wall_s:.1f} s wall",
    )  # fmt: skip
    return summary
