"""Pruning: ``python -m train.prune --checkpoint C --method M --sparsity S --out C2``.

- ``global-magnitude``: zero the smallest-|w| fraction S of all conv/linear weights
  (one threshold across layers; the head is left dense unless ``--prune-head``).
  The masks are stored in C2 and re-applied after every optimizer step when
  fine-tuning with ``python -m train --init-from C2 --keep-masks``.
- ``structured-channels``: remove the fraction S of output channels with the
  smallest L1 filter norm from each prunable conv and shrink the layers that read
  them: a physically smaller network. The new widths are stored in C2 so the
  trainer, evaluation and distillation rebuild it. Supported for seed_cnn (both
  convs) and cifar_fast / cifar_fast_s (the six convs of the three groups; a
  filter's norm is taken after folding in its batch norm's scale, which is what
  the next layer sees).

Prints params, non-zeros, MACs and CPU inference img/s before and after (``--json``
for one JSON object). Bad input ends with one ``prune: error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import fsspec
import torch
from torch import nn

from train import checkpoint
from train.checkpoint import CheckpointError
from train.models import MODELS, CifarFast, SeedCNN

METHODS = ("global-magnitude", "structured-channels")


class SlimSeedCNN(SeedCNN):
    """seed_cnn with fewer conv channels (same layer names, so state_dicts line up)."""

    def __init__(self, num_classes: int, widths: list[int]) -> None:
        super().__init__(num_classes)
        c1, c2 = widths
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, 120)
        self.widths = [c1, c2]


class SlimCifarFast(CifarFast):
    """cifar_fast(_s) with pruned conv widths; WIDTHS = [inner0, out0, inner1, out1, inner2, out2]."""

    def __init__(self, num_classes: int, widths: list[int]) -> None:
        outs, inner = tuple(widths[1::2]), tuple(widths[0::2])
        super().__init__(num_classes, widths=outs, inner=inner)
        self.widths = list(widths)


def build_slim(name: str, num_classes: int, widths: list[int]) -> nn.Module:
    """The channel-pruned architecture NAME with WIDTHS (as stored in a pruned checkpoint)."""
    if name not in STRUCTURED:
        raise CheckpointError(
            f"channel-pruned widths are defined for {', '.join(STRUCTURED)}, not {name}"
        )
    spec = STRUCTURED[name]
    if len(widths) != spec.n_widths or min(widths) < 1:
        raise CheckpointError(f"{name} widths must be {spec.n_widths} positive ints; got {widths}")
    return spec.slim(num_classes, [int(w) for w in widths])


def prunable(model: nn.Module, name: str, *, include_head: bool) -> dict[str, nn.Parameter]:
    """Conv and linear weights by state_dict name (the head only if INCLUDE_HEAD)."""
    head = MODELS[name].head
    out = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            if mod_name == head and not include_head:
                continue
            out[f"{mod_name}.weight"] = m.weight
    return out


@torch.no_grad()
def global_magnitude_masks(
    params: dict[str, torch.Tensor], sparsity: float
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing the SPARSITY fraction of smallest |w| over all PARAMS."""
    flat = torch.cat([p.detach().abs().flatten() for p in params.values()])
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    threshold = torch.kthvalue(flat, k).values
    masks = {n: p.detach().abs() > threshold for n, p in params.items()}
    # Ties at the threshold could prune a little more than asked; that is harmless.
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked-out weights in place (after every optimizer step when fine-tuning)."""
    sd = dict(model.named_parameters())
    for name, mask in masks.items():
        p = sd[name]
        p.mul_(mask.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def structured_seed_cnn(model: SeedCNN, sparsity: float) -> SlimSeedCNN:
    """Drop the lowest-L1 output channels of conv1 and conv2 and shrink conv2/fc1 inputs."""

    def keep(conv: nn.Conv2d) -> torch.Tensor:
        return _kept(conv.weight.abs().sum(dim=(1, 2, 3)), sparsity)

    k1, k2 = keep(model.conv1), keep(model.conv2)
    slim = SlimSeedCNN(model.fc3.out_features, [len(k1), len(k2)])
    slim.conv1.weight.copy_(model.conv1.weight[k1])
    slim.conv1.bias.copy_(model.conv1.bias[k1])
    slim.conv2.weight.copy_(model.conv2.weight[k2][:, k1])
    slim.conv2.bias.copy_(model.conv2.bias[k2])
    # fc1 reads the flattened (C, 5, 5) map channel-major: keep each kept channel's 25 columns.
    cols = (k2[:, None] * 25 + torch.arange(25)[None, :]).flatten()
    slim.fc1.weight.copy_(model.fc1.weight[:, cols])
    slim.fc1.bias.copy_(model.fc1.bias)
    for name in ("fc2", "fc3"):
        getattr(slim, name).load_state_dict(getattr(model, name).state_dict())
    return slim


def _kept(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sorted indices of the channels that stay: all but the round(SPARSITY * n) lowest."""
    n = scores.numel()
    k = max(1, n - int(round(sparsity * n)))
    return torch.sort(torch.topk(scores, k).indices).values


def _slice_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(getattr(src, name)[keep])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)


@torch.no_grad()
def structured_cifar_fast(model: CifarFast, sparsity: float) -> SlimCifarFast:
    """Drop the weakest output channels of each of the six group convs, and their inputs downstream.

    A channel's score is the L1 norm of its filter times |gamma| / sqrt(var + eps) of
    the batch norm that follows: the filter as the next layer sees it (a bare
    filter norm says little when a batch norm rescales it). The stem is kept.
    """
    keeps: list[torch.Tensor] = []
    for group in model.layers:
        for conv, bn in ((group[0], group[2]), (group[4], group[5])):
            scale = bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
            keeps.append(_kept(conv.weight.abs().sum(dim=(1, 2, 3)) * scale, sparsity))
    slim = SlimCifarFast(model.fc.out_features, [len(k) for k in keeps])
    slim.stem.load_state_dict(model.stem.state_dict())
    k_in = torch.arange(model.stem[0].out_channels)
    for g, (src, dst) in enumerate(zip(model.layers, slim.layers, strict=True)):
        k_mid, k_out = keeps[2 * g], keeps[2 * g + 1]
        dst[0].weight.copy_(src[0].weight[k_mid][:, k_in])
        _slice_bn(dst[2], src[2], k_mid)
        dst[4].weight.copy_(src[4].weight[k_out][:, k_mid])
        _slice_bn(dst[5], src[5], k_out)
        k_in = k_out
    slim.fc.weight.copy_(model.fc.weight[:, k_in])
    return slim


class Structured(NamedTuple):
    """How one model is channel-pruned: how many widths it stores, the slim
    architecture they build, and the pruning pass that makes one from a dense model."""

    n_widths: int
    slim: Callable[[int, list[int]], nn.Module]
    prune: Callable[[Any, float], nn.Module]


STRUCTURED = {
    "seed_cnn": Structured(2, SlimSeedCNN, structured_seed_cnn),
    "cifar_fast": Structured(6, SlimCifarFast, structured_cifar_fast),
    "cifar_fast_s": Structured(6, SlimCifarFast, structured_cifar_fast),
}


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image through the conv and linear layers (dense)."""
    total = 0

    def hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += out[0].numel() * k
        else:
            total += m.in_features * m.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def cpu_img_per_s(
    model: nn.Module, image_size: int, *, batch: int = 256, seconds: float = 1.0
) -> float:
    """Inference throughput on CPU with one batch size (eval mode, fp32)."""
    model = model.eval()
    x = torch.randn(batch, 3, image_size, image_size)
    model(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        model(x)
        n += batch
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 4 * batch:
            return n / elapsed


def stats(model: nn.Module, image_size: int) -> dict[str, float]:
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return {"params": params, "nonzero": nonzero, "macs": count_macs(model, image_size)}


def compare_speed(
    before: nn.Module, after: nn.Module, image_size: int, *, seconds: float, repeats: int
) -> dict[str, Any]:
    """CPU inference img/s of both models, timed in alternation REPEATS times.

    Alternating spreads whatever else runs on the machine over both models
    alike; the medians and their ratio are reported with every run.
    """
    runs: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(repeats):
        for key, model in (("before", before), ("after", after)):
            runs[key].append(round(cpu_img_per_s(model, image_size, seconds=seconds), 1))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "batch": 256,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "seconds_each": seconds,
        "before_runs": runs["before"],
        "after_runs": runs["after"],
        "median_before": med["before"],
        "median_after": med["after"],
        "speedup": round(med["after"] / med["before"], 3),
    }


def prune_checkpoint(
    url: str, *, method: str, sparsity: float, prune_head: bool = False
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(model before, model after, payload of the pruned checkpoint)."""
    from train.transfer import model_from_checkpoint

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1); got {sparsity}")
    state = checkpoint.load(url)
    meta = dict(state.get("meta") or {})
    before = model_from_checkpoint(state, url)
    name = meta["model"]
    after = model_from_checkpoint(state, url)
    masks: dict[str, torch.Tensor] = {}
    if method == "global-magnitude":
        masks = global_magnitude_masks(prunable(after, name, include_head=prune_head), sparsity)
        apply_masks(after, masks)
    else:
        if name not in STRUCTURED:
            raise ValueError(
                f"structured-channels supports {', '.join(STRUCTURED)}; {name} has residual "
                "blocks whose channel coupling this tool does not rewrite (use global-magnitude)"
            )
        if meta.get("widths"):
            raise ValueError(f"{url} is channel-pruned already (widths {meta['widths']})")
        after = STRUCTURED[name].prune(after, sparsity)
        meta["widths"] = after.widths
    payload = {
        "format": checkpoint.FORMAT,
        "meta": meta,
        "config": state.get("config"),
        "model": after.state_dict(),
        "masks": masks,
        "pruning": {"method": method, "sparsity": sparsity, "source": url},
    }
    return before, after, payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a trainer checkpoint (any fsspec URL)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--sparsity", required=True, type=float, help="fraction removed, in [0, 1)")
    p.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    p.add_argument("--prune-head", action="store_true", help="global-magnitude: prune the head too")
    p.add_argument("--bench-seconds", type=float, default=0.5,
                   help="CPU inference timing per model and repeat, seconds (0 = skip; default: 0.5)")  # fmt: skip
    p.add_argument("--bench-repeats", type=int, default=5,
                   help="timings per model, alternating; medians reported (default: 5)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads for timing (0 = default)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        before, after, payload = prune_checkpoint(
            args.checkpoint, method=args.method, sparsity=args.sparsity, prune_head=args.prune_head
        )
        size = int(payload["meta"].get("image_size") or 32)
        summary = {
            "method": args.method,
            "sparsity": args.sparsity,
            "out": args.out,
            "before": stats(before, size),
            "after": stats(after, size),
            "widths": payload["meta"].get("widths"),
        }
        if args.bench_seconds > 0:
            bench = compare_speed(
                before, after, size, seconds=args.bench_seconds, repeats=args.bench_repeats
            )
            summary["bench"] = bench
            summary["before"]["cpu_img_per_s"] = bench["median_before"]
            summary["after"]["cpu_img_per_s"] = bench["median_after"]
        with fsspec.open(args.out, "wb") as f:
            torch.save(payload, f)
    except (ValueError, OSError) as exc:
        print(f"prune: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        b, a = summary["before"], summary["after"]
        for key in ("params", "nonzero", "macs", "cpu_img_per_s"):
            if key in b:
                print(f"{key:>14}: {b[key]:>14,} -> {a[key]:>14,}")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
