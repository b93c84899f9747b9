"""DALI backends (dali-cpu, dali-gpu): our shard reader feeds fn.external_source.

DALI's own S3 reading issues one ranged GET per tar member (~100 samples/s on
a loopback server); feeding encoded bytes from :mod:`pipeline.reader` keeps
large sequential reads, the exact planned order (resume, accounting) and the
corrupt-sample checks, and leaves DALI the decode and augmentation.

One DALI pipeline is built per iteration (milliseconds), seeded from
(seed, epoch, rank, generation, start step). Outputs are copied out of DALI's
buffers (which it reuses on the next run) before they are handed on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.reader import encoded_batches

try:
    from nvidia.dali import Pipeline, fn, types

    DALI_ERROR = None
except ImportError as exc:  # the package works without DALI; only these backends need it
    DALI_ERROR = exc


class DaliUnavailable(RuntimeError):
    """DALI is not installed (or a GPU backend was requested without a GPU)."""


class DaliBackend:
    """Decode + augment with DALI on the CPU or the GPU (``cfg.backend``)."""

    def __init__(self, cfg, world, device: torch.device) -> None:
        if DALI_ERROR is not None:
            raise DaliUnavailable(
                f"backend {cfg.backend!r} needs NVIDIA DALI ({DALI_ERROR}); install it with "
                "pip install -e '.[dali]' or use backend='torch'"
            )
        self.cfg = cfg
        self.world = world
        self.device = device
        self.dali_device = "gpu" if cfg.backend == "dali-gpu" else "cpu"
        self.dtype = getattr(torch, cfg.dtype)

    def _pipeline(self, source, seed: int):
        from pipeline.dali_graph import build_graph

        gpu = self.dali_device == "gpu"
        device_id = (self.device.index or 0) if gpu else None
        pipe = Pipeline(
            batch_size=self.cfg.batch_size,
            num_threads=self.cfg.num_threads,
            device_id=device_id,
            seed=seed & 0x7FFFFFFF,
            prefetch_queue_depth=self.cfg.prefetch,
        )
        with pipe:
            encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1)
            pipe.set_outputs(build_graph(encoded, self.cfg, self.dali_device))
        pipe.build()
        return pipe

    def _to_torch(self, out) -> torch.Tensor:
        nhwc = torch.from_dlpack(out.as_tensor())
        nchw = nhwc.permute(0, 3, 1, 2)  # NHWC memory == NCHW in channels_last format
        moved = nchw.to(self.device, self.dtype, non_blocking=True)
        # DALI reuses its output buffers on the next run: own the memory before returning.
        if moved.data_ptr() == nchw.data_ptr():
            moved = moved.clone()
        return moved

    def batches(self, job) -> Iterator[Batch]:
        source = encoded_batches(job)
        meta: deque = deque()

        def feed():
            enc = next(source)  # StopIteration ends DALI's epoch
            meta.append(enc)
            return [np.frombuffer(img, dtype=np.uint8) for img in enc.images]

        pipe = self._pipeline(feed, job.seed_for(job.start))
        try:
            for _ in range(job.start, job.plan.steps):
                (out,) = pipe.run()
                images = self._to_torch(out)
                enc = meta.popleft()
                labels = torch.from_numpy(enc.labels).to(self.device, non_blocking=True)
                yield Batch(images, labels, enc.keys, enc.skipped)
        finally:
            del pipe
            source.close()

    def close(self) -> None:
        pass
