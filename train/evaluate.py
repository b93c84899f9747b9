"""Evaluation: top-1 and loss over a dataset on all ranks, and the standalone CLI.

    python -m train.evaluate --checkpoint RUN/checkpoints/step-000001234.pt --data URL

Every rank evaluates its share; per-sample results are merged by key, so the
repeats the loader adds to give every rank whole batches are counted once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from train import distributed, transfer
from train.checkpoint import CheckpointError, load, load_weights, step_of
from train.config import BACKENDS, DataConfig, OneLineParser
from train.data import check_same_classes, dataset_classes, loader_config, make_loader
from train.entry import exit_now, status_of
from train.errors import known_error, print_error


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over every distinct sample, all ranks."""
    was_training = model.training
    model.eval()
    per_key: dict[str, tuple[float, bool]] = {}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for batch in loader:
        images = batch.images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        labels = batch.labels.to(device, non_blocking=True)
        with ctx:
            logits = model(images)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        correct = logits.argmax(1) == labels
        per_key.update(
            zip(batch.keys, zip(losses.tolist(), correct.tolist(), strict=True), strict=True)
        )
    model.train(was_training)
    merged: dict[str, tuple[float, bool]] = {}
    for part in distributed.all_gather_object(per_key):
        merged.update(part)
    n = len(merged)
    return {
        "samples": n,
        "top1": sum(c for _, c in merged.values()) / max(1, n),
        "loss": sum(loss for loss, _ in merged.values()) / max(1, n),
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m train.evaluate", description="Evaluate a checkpoint on a dataset."
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file (path or fsspec URL)")
    p.add_argument("--data", required=True, help="dataset folder or URL written by `shard pack`")
    p.add_argument(
        "--backend",
        default="dali-cpu",
        choices=BACKENDS,
        help="loader backend (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=500, help="GLOBAL batch size (default: %(default)s)"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="loader workers/threads per rank (default: %(default)s)",
    )
    p.add_argument(
        "--ema", action="store_true", help="evaluate the EMA weights stored in the checkpoint"
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: %(default)s)"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ARGS.checkpoint on ARGS.data with the model recorded in the checkpoint."""
    d = distributed.setup(device=args.device)
    state = load(args.checkpoint)
    meta = state.get("meta")
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(
            f"{args.checkpoint} is not a training checkpoint of this trainer (no meta)"
        )
    data_classes = dataset_classes(args.data)
    if len(data_classes) != meta["num_classes"]:
        raise ValueError(
            f"the checkpoint's model has {meta['num_classes']} classes but {args.data} has {len(data_classes)}"
        )
    if meta.get("classes"):
        check_same_classes(meta["classes"], args.checkpoint, data_classes, args.data)
    # The architecture the checkpoint records (channel-pruned widths included).
    model = transfer.model_from_checkpoint(state, args.checkpoint)
    if args.ema:
        if not state.get("ema"):
            raise CheckpointError(
                f"{args.checkpoint} holds no EMA weights (trained without --ema-decay)"
            )
        load_weights(model, state["ema"])
    channels_last = bool(meta.get("channels_last", True))
    model.to(
        d.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    if args.batch_size % d.world_size:
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by world_size {d.world_size}"
        )
    dcfg = DataConfig(data=args.data, backend=args.backend, num_workers=args.num_workers)
    lcfg = loader_config(
        dcfg, url=args.data, train=False, per_rank_batch=args.batch_size // d.world_size,
        image_size=meta["image_size"], seed=0, device=d.device, num_classes=meta["num_classes"],
    )  # fmt: skip
    loader = make_loader(lcfg, d.world)
    try:
        amp = torch.bfloat16 if d.device.type == "cuda" else None
        result = evaluate(
            model, loader, device=d.device, amp_dtype=amp, channels_last=channels_last
        )
    finally:
        loader.close()
    result = {"checkpoint": args.checkpoint, "data": args.data, "step": step_of(state), **result}
    if d.is_main:
        print(json.dumps(result), flush=True)
    return result


@record
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        run(args)
        return 0
    except Exception as exc:
        if not known_error(exc):
            raise
        print_error("python -m train.evaluate", str(exc))
        return 1
    finally:
        distributed.teardown()


if __name__ == "__main__":
    exit_now(status_of(main))  # see train.entry: no interpreter finalization after teardown
