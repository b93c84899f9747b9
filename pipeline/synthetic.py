"""Synthetic backend: the data-loading ceiling (random tensors made once, reused)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.batch import Batch


class SyntheticBackend:
    """Returns the same random batch every step: costs nothing, so a trainer fed
    by it shows whether the model or the data path is the bottleneck."""

    def __init__(self, cfg, device: torch.device, num_classes: int) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
        images = torch.randn(shape, generator=gen).to(getattr(torch, cfg.dtype))
        self.images = images.to(device).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, num_classes, (cfg.batch_size,), generator=gen, dtype=torch.int64)
        self.labels = labels.to(device)

    def batches(self, job) -> Iterator[Batch]:
        for step in range(job.start, job.plan.steps):
            yield Batch(self.images, self.labels, job.ref_keys(step))

    def close(self) -> None:
        pass
