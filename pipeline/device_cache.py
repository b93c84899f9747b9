"""Small-image mode: decode the dataset once into a uint8 tensor on the device.

For CIFAR-scale data a GPU trains faster than any JPEG decoder feeds it, so
the images are decoded once (resized to ``image_size``, zero-padded by
``pad_px``) into an NHWC uint8 tensor on the training device, and every batch
is one gather there that does pad-and-random-crop and the flips at once, then
(if configured) rotation/translation and colour jitter as batched float ops,
then normalise. Works on the CPU too.

Interaction with the plan: the cache holds the WHOLE dataset on every rank
(CIFAR-10: 50,000 x 32 x 32 x 3 = 150 MB), not just the rank's share, so the
batches follow exactly the same plan as the streaming backends (same keys in
the same order on every rank, resume and elastic resume unchanged), only
without reading or decoding after the first epoch. ``cache_max_gb`` bounds it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.batch import Batch
from pipeline.columns import to_sample
from pipeline.reader import CorruptDataError, extra_text
from pipeline.torch_backend import Normalizer

log = logging.getLogger("pipeline")


class DeviceCacheBackend:
    """Batches gathered from a device-resident uint8 cache, augmented with tensor ops."""

    def __init__(self, cfg, world, device: torch.device, dataset) -> None:
        self.cfg = cfg
        self.device = device
        self.dataset = dataset
        sizes = dataset.manifest.shard_sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        need = self.offsets[-1] * (cfg.image_size + 2 * cfg.pad_px) ** 2 * 3
        if need > cfg.cache_max_gb * 2**30:
            raise ValueError(
                f"cache='device' needs {need / 2**30:.1f} GiB for {self.offsets[-1]} images at "
                f"{cfg.image_size} px, over cache_max_gb={cfg.cache_max_gb}; stream it instead"
            )
        self.pad = cfg.pad_px if cfg.train else 0
        self.images: torch.Tensor | None = None  # uint8 [N, S+2p, S+2p, 3]
        self.normalize = Normalizer(cfg, device)

    def _fill(self) -> None:
        """Read and decode every shard once."""
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import resize

        size = self.cfg.image_size
        p = self.pad
        n = int(self.offsets[-1])
        # Stored already padded (zeros) so the random crop is a single gather.
        images = torch.zeros((n, size + 2 * p, size + 2 * p, 3), dtype=torch.uint8)
        labels = np.zeros(n, dtype=np.int64)
        valid = np.zeros(n, dtype=bool)
        keys: list[str] = [""] * n
        problems: dict[int, str] = {}
        names = self.dataset.shard_names
        extra: list[dict[str, bytes] | None] = [None] * n
        for shard, count in enumerate(self.dataset.manifest.shard_sizes):
            raws = self.dataset.read_samples(shard, np.arange(count))
            for i, raw in enumerate(raws):
                row = int(self.offsets[shard]) + i
                s = to_sample(raw, self.dataset.labelled)
                keys[row], labels[row], extra[row] = s.key, s.label, s.extra
                if s.problem is not None:
                    problems[row] = s.problem
                    _warn(s.key, names[shard], i, s.problem)
                    continue
                try:
                    buf = torch.frombuffer(bytearray(s.image), dtype=torch.uint8)
                    with warnings.catch_warnings():  # see torch_backend.decode_batch
                        warnings.filterwarnings("ignore", category=DeprecationWarning)
                        img = decode_image(buf, ImageReadMode.RGB)
                except RuntimeError as exc:
                    problems[row] = f"decode failed: {exc}"
                    _warn(s.key, names[shard], i, problems[row])
                    continue
                if img.shape[1:] != (size, size):
                    img = resize(img, [size, size], antialias=True)
                images[row, p : p + size, p : p + size] = img.permute(1, 2, 0)
                valid[row] = True
        self.images = images.to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.valid = valid
        self.keys = keys
        self.extra = extra
        self.problems = problems

    def batches(self, job) -> Iterator[Batch]:
        if self.images is None:
            self._fill()
        for step in range(job.start, job.plan.steps):
            shard, index, _ = job.refs(step)
            rows = self.offsets[shard] + index
            ok = self.valid[rows]
            skipped = tuple(self.keys[r] for r in rows[~ok].tolist())
            if not ok.all():
                if not ok.any():
                    raise CorruptDataError(f"every image of step {step} is corrupt: {skipped}")
                rows = np.where(ok, rows, rows[np.argmax(ok)])
            idx = torch.from_numpy(rows).to(self.device)
            gen = torch.Generator(device=self.device).manual_seed(job.seed_for(step))
            x = crop_flip(self.images, idx, self.cfg, gen, self.pad)
            if self.cfg.train and (self.cfg.rotate_deg or self.cfg.translate or self.cfg.brightness
                                   or self.cfg.contrast or self.cfg.saturation):  # fmt: skip
                y = _float_ops(x.permute(0, 3, 1, 2).float(), self.cfg, gen)
                x = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            keys = [self.keys[r] for r in rows.tolist()]
            images = self.normalize(x.permute(0, 3, 1, 2))  # NHWC memory: no layout copy
            text = extra_text([self.extra[r] for r in rows.tolist()], self.cfg.extra_members)
            yield Batch(images, self.labels.index_select(0, idx), keys, skipped, text)

    def close(self) -> None:
        self.images = None


def _warn(key: str, shard_name: str, index: int, problem: str) -> None:
    # Worded as the streaming backends word it (pipeline.reader), so logs read the same.
    log.warning("skipping corrupt sample %s (%s#%d): %s", key, shard_name, index, problem)


def _uniform(n: int, lo: float, hi: float, gen, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def crop_flip(cache: torch.Tensor, idx: torch.Tensor, cfg, gen, pad: int) -> torch.Tensor:
    """Rows IDX of CACHE (uint8 NHWC, padded by PAD) randomly cropped to the output
    size and flipped (train), as ONE gather of pixel triplets: uint8 NHWC."""
    n, side = len(idx), cache.shape[1]
    size = side - 2 * pad
    dev = cache.device
    ar = torch.arange(size, device=dev)
    ys = xs = ar.expand(n, size)
    if cfg.train:
        if pad:
            ys = ys + torch.randint(0, 2 * pad + 1, (n, 1), generator=gen, device=dev)
            xs = xs + torch.randint(0, 2 * pad + 1, (n, 1), generator=gen, device=dev)
        if cfg.hflip:
            flip = torch.rand(n, 1, generator=gen, device=dev) < cfg.hflip
            xs = torch.where(flip, xs.flip(1), xs)
        if cfg.vflip:
            flip = torch.rand(n, 1, generator=gen, device=dev) < cfg.vflip
            ys = torch.where(flip, ys.flip(1), ys)
    else:
        ys, xs = ys + pad, xs + pad
    flat = (idx[:, None, None] * side + ys[:, :, None]) * side + xs[:, None, :]
    return cache.view(-1, 3).index_select(0, flat.view(-1)).view(n, size, size, 3)


def _float_ops(x: torch.Tensor, cfg, gen) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    if cfg.rotate_deg or cfg.translate:
        angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen, dev) * (math.pi / 180)
        shift = _uniform(2 * n, -cfg.translate, cfg.translate, gen, dev).view(n, 2) * 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.brightness:
        x = x * _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, gen, dev)[:, None, None, None]
    gray_w = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    if cfg.contrast:
        f = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, gen, dev)[:, None, None, None]
        mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = (x - mean) * f + mean
    if cfg.saturation:
        f = _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, gen, dev)[:, None, None, None]
        gray = (x * gray_w).sum(1, keepdim=True)
        x = (x - gray) * f + gray
    return x.clamp(0, 255)
