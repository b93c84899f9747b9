"""Knowledge distillation: a frozen teacher's softened outputs as an extra target.

loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))

The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al.).
The teacher sees the same augmented batch as the student, in eval mode, under no_grad.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train import checkpoint


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    ce: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distillation loss, mean over the batch. CE may be given (e.g. label-smoothed)."""
    if ce is None:
        ce = F.cross_entropy(student_logits.float(), labels)
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * ce + alpha * t * t * kl


class Distiller:
    """Wraps the teacher; called by the train step as loss(student_logits, images, labels)."""

    def __init__(
        self, teacher: nn.Module, criterion: nn.Module, *, alpha: float, temperature: float
    ) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.criterion = criterion
        self.alpha = alpha
        self.temperature = temperature

    def __call__(
        self, student_logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits = self.teacher(images)
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            alpha=self.alpha,
            temperature=self.temperature,
            ce=self.criterion(student_logits, labels),
        )


def load_teacher(
    url: str, *, num_classes: int, device: torch.device, channels_last: bool
) -> nn.Module:
    """The teacher network, its architecture read from the checkpoint's stored metadata."""
    from train.transfer import model_from_checkpoint

    state = checkpoint.load(url)
    meta: dict[str, Any] = state.get("meta") or {}
    if not meta.get("model"):
        raise checkpoint.CheckpointError(
            f"--teacher {url} has no stored model name (a checkpoint written by this trainer "
            "or by train.prune is needed)"
        )
    if meta.get("num_classes") != num_classes:
        raise checkpoint.CheckpointError(
            f"--teacher {url} predicts {meta.get('num_classes')} classes but the data has {num_classes}"
        )
    model = model_from_checkpoint(state, url)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
