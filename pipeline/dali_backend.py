"""DALI backends (dali-cpu, dali-gpu): our shard reader feeds fn.external_source.

DALI's own S3 reading issues one ranged GET per tar member (~100 samples/s on
a loopback server); feeding encoded bytes from :mod:`pipeline.reader` keeps
large sequential reads, the exact planned order (resume, accounting) and the
corrupt-sample checks, and leaves DALI the decode and augmentation.

One DALI pipeline is built per iteration (milliseconds), seeded from
(seed, epoch, rank, generation, start step). Outputs reach torch through DLPack without a copy (DALI's default dynamic
executor never recycles an output that is still referenced); the NHWC batch
is the channels_last layout of the NCHW view handed out.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.reader import encoded_batches, extra_text, full_decode_check

log = logging.getLogger("pipeline")

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

    def _to_torch(self, out, dynamic: bool) -> torch.Tensor:
        if dynamic and out.is_dense_tensor():
            # DALI's dynamic executor (its default) allocates every output afresh and
            # never recycles memory that is still referenced; the DLPack capsule keeps
            # the TensorList alive, so the zero-copy view stays valid after later runs
            # (tests/pipeline/test_loader.py checks it).
            nhwc = torch.from_dlpack(out.as_tensor())
        else:
            # Other executors reuse output buffers on the next run: copy out once.
            shape = (len(out), *out.shape()[0])
            dali_dtype = torch.float16 if self.cfg.dtype == "float16" else torch.float32
            gpu = self.dali_device == "gpu"
            nhwc = torch.empty(shape, dtype=dali_dtype, device=self.device if gpu else "cpu")
            ptr = ctypes.c_void_p(nhwc.data_ptr())
            if gpu:
                out.copy_to_external(
                    ptr, torch.cuda.current_stream(self.device).cuda_stream, non_blocking=True
                )
            else:
                out.copy_to_external(ptr)
        nchw = nhwc.permute(0, 3, 1, 2)  # NHWC memory == NCHW in channels_last format
        return nchw.to(self.device, self.dtype, non_blocking=True)

    def batches(self, job) -> Iterator[Batch]:
        source = encoded_batches(job)
        in_flight: deque = deque()  # batches fed to DALI whose outputs are not out yet
        replay: deque = deque()  # checked batches to feed again after a decoder error

        reader_errors: list[BaseException] = []

        def feed():
            try:
                enc = replay.popleft() if replay else next(source)
            except StopIteration:  # ends DALI's epoch
                raise
            except Exception as exc:  # DALI would wrap it; keep the reader's own message
                reader_errors.append(exc)
                raise
            in_flight.append(enc)
            return [np.frombuffer(img, dtype=np.uint8) for img in enc.images]

        step = job.start
        failed_at = -1
        pipe = self._pipeline(feed, job.seed_for(step))
        try:
            while step < job.plan.steps:
                try:
                    (out,) = pipe.run()
                except (RuntimeError, StopIteration) as exc:
                    if reader_errors:  # a shard could not be read: not a decoding problem
                        raise reader_errors[0] from None
                    if isinstance(exc, StopIteration):
                        raise RuntimeError(f"DALI ended the epoch early, at step {step}") from None
                    # A decoder error poisons the whole pipeline. Rebuild it and feed the
                    # batches that were in flight again, after a full decode check that
                    # swaps out the undecodable images; a second error at the same step
                    # means something else is wrong.
                    if failed_at == step:
                        raise
                    failed_at = step
                    log.warning("DALI failed at step %d (%s); checking the batches in flight",
                                step, str(exc).strip().splitlines()[-1])  # fmt: skip
                    pipe = None
                    redo = [full_decode_check(enc) for enc in in_flight] + list(replay)
                    in_flight.clear()
                    replay.clear()
                    replay.extend(redo)
                    pipe = self._pipeline(feed, job.seed_for(step))
                    continue
                images = self._to_torch(out, pipe.exec_dynamic)
                enc = in_flight.popleft()
                labels = torch.from_numpy(enc.labels).to(self.device, non_blocking=True)
                yield Batch(images, labels, enc.keys, enc.skipped,
                            extra_text(enc.extra, self.cfg.extra_members))  # fmt: skip
                step += 1
        finally:
            pipe = None
            source.close()

    def close(self) -> None:
        pass
