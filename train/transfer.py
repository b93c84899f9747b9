"""Transfer learning: start a run from another run's weights (or a plain torchvision
state_dict) and either train only the classifier on frozen features (``features``) or
everything with a smaller backbone learning rate (``finetune``).

The backbone must fit exactly (names and shapes); only the head (the final linear
layer) may differ, and a head whose class count differs is left freshly initialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from train import checkpoint
from train.checkpoint import CheckpointError
from train.models import MODELS, build_model, classifier_parameters


@dataclass(kw_only=True)
class Source:
    """What --init-from provides."""

    url: str
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def widths(self) -> list[int] | None:
        return self.meta.get("widths")


def read_source(url: str, model_name: str) -> Source:
    """Load --init-from URL and check it was made for MODEL_NAME (when it says)."""
    state = checkpoint.load(url)
    meta = state.get("meta") or {}
    if meta.get("model") and meta["model"] != model_name:
        raise CheckpointError(
            f"--init-from {url} holds a {meta['model']} model, not --model {model_name}"
        )
    try:
        weights = checkpoint.model_weights(state)
    except CheckpointError:
        raise CheckpointError(f"--init-from {url} holds no model state_dict") from None
    masks = state.get("masks") or {}
    return Source(url=url, weights=weights, meta=dict(meta), masks=dict(masks))


def build_for(source: Source | None, name: str, num_classes: int, *, cifar_stem: bool) -> nn.Module:
    """A fresh model of NAME, with the (pruned) channel widths SOURCE records, if any."""
    if source is not None and source.widths:
        from train.prune import build_slim

        return build_slim(name, num_classes, source.widths)
    return build_model(name, num_classes, cifar_stem=cifar_stem)


def model_from_checkpoint(state: dict[str, Any], url: str) -> nn.Module:
    """Rebuild the model a checkpoint describes (architecture from its meta) and load it strictly."""
    meta = state.get("meta") or {}
    if meta.get("model") not in MODELS:
        raise CheckpointError(f"{url} names no known model (meta.model={meta.get('model')!r})")
    src = Source(url=url, weights=checkpoint.model_weights(state), meta=dict(meta))
    model = build_for(
        src, meta["model"], int(meta["num_classes"]), cifar_stem=bool(meta.get("cifar_stem"))
    )
    try:
        checkpoint.load_weights(model, src.weights)
    except CheckpointError as exc:
        raise CheckpointError(f"{url}: {exc}") from None
    return model


def load_backbone(model: nn.Module, name: str, source: Source) -> bool:
    """Copy SOURCE's weights into MODEL: the backbone exactly, the head only if it fits.

    Returns True when the head was loaded too (same class count)."""
    head = MODELS[name].head + "."
    own = model.state_dict()
    sd = source.weights
    problems = []
    for k, v in own.items():
        if k.startswith(head):
            continue
        if k not in sd:
            problems.append(f"missing {k}")
        elif sd[k].shape != v.shape:
            problems.append(
                f"{k} is {tuple(sd[k].shape)} there, {tuple(v.shape)} in --model {name}"
            )
    extra = sorted(k for k in sd if k not in own and not k.startswith(head))
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"--init-from {source.url} does not fit --model {name}: {'; '.join(problems[:3])}{more}"
        )
    head_fits = all(
        k in sd and sd[k].shape == v.shape for k, v in own.items() if k.startswith(head)
    )
    checkpoint.load_weights(model, sd, strict=False, skip=() if head_fits else (head,))
    return head_fits


@dataclass(kw_only=True)
class TransferPlan:
    lr_mult_of: dict[int, float]  # id(param) -> lr multiplier
    frozen_modules: list[nn.Module]  # kept in eval mode during training (frozen BN stats)


def prepare(
    model: nn.Module, name: str, mode: str, backbone_lr_mult: float, head_lr_mult: float = 1.0
) -> TransferPlan:
    """Freeze the backbone (features) or scale its lr (finetune); scale the classifier's lr.

    The backbone is everything outside the model's classifier (seed_cnn: its convs;
    other models: all but the final linear layer)."""
    classifier = {i: head_lr_mult for i in classifier_parameters(model, name)}
    backbone = [p for p in model.parameters() if id(p) not in classifier]
    if mode == "features":
        for p in backbone:
            p.requires_grad_(False)
        # BN in a frozen backbone must use its stored statistics, not update them.
        frozen = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        return TransferPlan(lr_mult_of=classifier, frozen_modules=frozen)
    if mode == "finetune":
        mults = {id(p): backbone_lr_mult for p in backbone}
        return TransferPlan(lr_mult_of=mults | classifier, frozen_modules=[])
    return TransferPlan(lr_mult_of=classifier, frozen_modules=[])
