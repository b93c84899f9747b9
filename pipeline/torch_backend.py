"""The plain PyTorch backend: torchvision decode + v2 transforms in worker processes.

This is the baseline most users run and the fallback without DALI. It uses the
same reader and order as every backend; each batch of encoded bytes goes to a
worker process (started from a forkserver, so the reader threads and any S3 client are never
forked), which decodes and augments it with the torch RNG seeded from
(seed, epoch, rank, generation, step) and returns uint8 NCHW through shared
memory. Results are consumed in submission order, so the output does not
depend on worker timing, and a resumed loader reproduces the same images.
Normalisation to float happens in the main process: shipping uint8 is 4x
less data than float32. As with any spawn/forkserver start method, a script
that iterates this backend with ``num_workers > 0`` needs the usual
``if __name__ == "__main__":`` guard; without it, the first iteration raises
WorkerStartError naming the script's line (``pipeline.mainguard``).
"""

from __future__ import annotations

import multiprocessing as mp
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from pipeline.batch import Batch
from pipeline.mainguard import unguarded_top_level_line
from pipeline.reader import CorruptDataError, EncodedBatch, encoded_batches, extra_text


@dataclass(frozen=True, kw_only=True)
class AugParams:
    """The augmentation fields of LoaderConfig (small and picklable for workers)."""

    train: bool
    recipe: str
    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    rotate_deg: float
    translate: float
    hflip: float
    vflip: float
    brightness: float
    contrast: float
    saturation: float
    pad_px: int
    eval_resize: int

    @classmethod
    def from_config(cls, cfg) -> AugParams:
        return cls(
            train=cfg.train,
            recipe=cfg.recipe,
            image_size=cfg.image_size,
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            rotate_deg=cfg.rotate_deg,
            translate=cfg.translate,
            hflip=cfg.hflip,
            vflip=cfg.vflip,
            brightness=cfg.brightness,
            contrast=cfg.contrast,
            saturation=cfg.saturation,
            pad_px=cfg.pad_px,
            eval_resize=cfg.resolved_eval_resize,
        )


_TRANSFORMS: dict[AugParams, object] = {}


def build_transform(p: AugParams):
    """torchvision v2 pipeline on uint8 CHW tensors, meaning what the DALI graph means."""
    from torchvision.transforms import v2

    size = p.image_size
    if not p.train and p.recipe == "small":
        return v2.Resize((size, size), antialias=True)
    if not p.train:
        return v2.Compose([v2.Resize(p.eval_resize, antialias=True), v2.CenterCrop(size)])
    steps: list = []
    if p.recipe == "small":
        steps += [v2.Resize((size, size), antialias=True), v2.RandomCrop(size, padding=p.pad_px)]
    else:
        steps.append(v2.RandomResizedCrop(size, scale=p.scale, ratio=p.ratio, antialias=True))
    if p.rotate_deg or p.translate:
        steps.append(v2.RandomAffine(degrees=p.rotate_deg, translate=(p.translate, p.translate)))
    if p.brightness or p.contrast or p.saturation:
        steps.append(v2.ColorJitter(p.brightness, p.contrast, p.saturation))
    if p.hflip:
        steps.append(v2.RandomHorizontalFlip(p.hflip))
    if p.vflip:
        steps.append(v2.RandomVerticalFlip(p.vflip))
    return v2.Compose(steps)


def decode_batch(
    images: list[bytes], params: AugParams, seed: int
) -> tuple[torch.Tensor, list[int]]:
    """Decode + augment a batch; return uint8 [N, 3, S, S] and the indices that failed
    to decode (their rows hold a copy of the first good image)."""
    transform = _TRANSFORMS.get(params)
    if transform is None:
        transform = _TRANSFORMS[params] = build_transform(params)
    # torchvision's transforms draw from torch's global RNG. Decoding in the caller's
    # process (num_workers=0) must not reseed the trainer's stream (dropout, ...):
    # the batch's seed applies inside a forked RNG state only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _decode_into(images, transform, params.image_size)


def _decode_into(images: list[bytes], transform, size: int) -> tuple[torch.Tensor, list[int]]:
    from torchvision.io import ImageReadMode, decode_image

    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    failed: list[int] = []
    first_ok = -1
    for i, data in enumerate(images):
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of torchcodec, which this
                # project does not depend on; they still work and are the fastest CPU option.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                img = decode_image(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
                )
            out[i] = transform(img)
        except (RuntimeError, ValueError) as exc:  # corrupt data that passed the byte checks
            failed.append(i)
            del exc
            continue
        if first_ok < 0:
            first_ok = i
    if failed and first_ok >= 0:
        out[failed] = out[first_ok].clone()
    return out, failed


def _init_worker() -> None:
    # One thread per worker process: the processes are the parallelism.
    torch.set_num_threads(1)


def _worker_context():
    # forkserver: one clean server process imports torch/torchvision once and
    # forks each worker from it, so workers start in milliseconds instead of
    # each paying the multi-second import, and nothing is forked from a
    # process that runs reader threads or holds a CUDA context.
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torchvision.io", "torchvision.transforms.v2", __name__])
    return ctx


class WorkerStartError(RuntimeError):
    """Decode workers cannot start from where the loader is iterated."""


class Normalizer:
    """uint8 NCHW (any memory format) -> normalised float (cfg.dtype) NCHW in
    channels_last memory format, on the device."""

    def __init__(self, cfg, device: torch.device) -> None:
        self.device = device
        self.dtype = getattr(torch, cfg.dtype)
        self.mean = torch.tensor([m * 255 for m in cfg.mean], device=device)
        self.inv_std = torch.tensor([1 / (s * 255) for s in cfg.std], device=device)
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        nhwc = images_u8.to(self.device, non_blocking=True).permute(0, 2, 3, 1).contiguous()
        n, h, w, c = nhwc.shape
        if w not in self._rows:
            self._rows[w] = (self.mean.repeat(w), self.inv_std.repeat(w))
        mean, inv_std = self._rows[w]
        # Broadcasting over whole rows (W*C values) instead of the 3 channels keeps the
        # innermost loop long and vectorised: ~10x faster on the CPU.
        x = nhwc.view(n, h, w * c).to(torch.float32).sub_(mean).mul_(inv_std)
        return x.view(n, h, w, c).permute(0, 3, 1, 2).to(self.dtype)


class TorchBackend:
    """Decode and augment in ``num_workers`` spawned processes (0: in this process)."""

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.params = AugParams.from_config(cfg)
        self.normalize = Normalizer(cfg, device)
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            unguarded = unguarded_top_level_line()
            if unguarded is not None:
                script, line = unguarded
                raise WorkerStartError(
                    f"{script}:{line} iterates a torch-backend loader with num_workers="
                    f"{self.cfg.num_workers} from top-level code: its decode worker processes "
                    "start by importing the script, which would run that code again. Put the "
                    'code that builds and iterates the loader under `if __name__ == "__main__":`, '
                    "or use num_workers=0"
                )
            self._pool = ProcessPoolExecutor(
                self.cfg.num_workers, mp_context=_worker_context(), initializer=_init_worker
            )
        return self._pool

    def _finish(self, enc: EncodedBatch, images: torch.Tensor, failed: list[int]) -> Batch:
        keys, labels, skipped = list(enc.keys), enc.labels.copy(), list(enc.skipped)
        extra = list(enc.extra) if enc.extra is not None else None
        if failed:
            good = next((i for i in range(len(keys)) if i not in set(failed)), None)
            if good is None:
                raise CorruptDataError(f"no image of batch {enc.step} could be decoded ({keys})")
            for i in failed:
                skipped.append(keys[i])
                keys[i], labels[i] = keys[good], labels[good]
                if extra is not None:
                    extra[i] = extra[good]  # the row stands in for GOOD entirely
        labels_t = torch.from_numpy(labels).to(self.device, non_blocking=True)
        text = extra_text(extra, self.cfg.extra_members)
        return Batch(self.normalize(images), labels_t, keys, tuple(skipped), text)

    def batches(self, job) -> Iterator[Batch]:
        source = encoded_batches(job)
        try:
            if self.cfg.num_workers == 0:
                for enc in source:
                    images, failed = decode_batch(enc.images, self.params, job.seed_for(enc.step))
                    yield self._finish(enc, images, failed)
                return
            pool = self._executor()
            in_flight: deque = deque()
            depth = self.cfg.num_workers + self.cfg.prefetch
            for enc in source:
                fut = pool.submit(decode_batch, enc.images, self.params, job.seed_for(enc.step))
                in_flight.append((enc, fut))
                if len(in_flight) >= depth:
                    done, fut = in_flight.popleft()
                    yield self._finish(done, *fut.result())
            while in_flight:
                done, fut = in_flight.popleft()
                yield self._finish(done, *fut.result())
        finally:
            source.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
