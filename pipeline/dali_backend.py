"""DALI backends (dali-cpu, dali-gpu): our shard reader feeds one DALI pipeline.

How the feed is laid out, per loader:

- the shard reader (:mod:`pipeline.reader`: ranged reads, the planned order, byte
  checks, corrupt-sample replacement, retries) runs in a process of its own
  (:mod:`pipeline.readerproc`), which also draws each sample's augmentation
  (:mod:`pipeline.augment`) and hands batches over through shared memory, or, for
  photos of local shards on the CPU backend, as spans of the shard files; with
  ``reader="thread"`` it runs in threads of this process instead;
- one DALI pipeline, built once and kept for every epoch and resume, is fed those
  bytes (in place: a batch of small images, or any batch on a GPU, as its one
  shared-memory buffer and each image's span, cut apart by DALI; see
  PACKED_UP_TO; other batches image by image, views of shared memory or of this
  process's mapping of the shard files) and parameters explicitly by a feeder
  thread, which runs ``prefetch`` batches ahead, copies the labels to the device
  from pinned memory, queues finished batches, and goes on into the next epoch
  before the training loop asks for it (:mod:`pipeline.stream`);
- the training thread only takes finished batches from that queue.

DALI draws nothing (the parameters come with the bytes), so a resumed run gets
the pixels the uninterrupted one would have. A decoder error does not rebuild
the pipeline either: the images of the failed batch are decoded one by one by
the same pipeline (the same decoder, nvJPEG/nvImageCodec on a GPU), the ones
it rejects are replaced like corrupt samples, and the batch runs again.

Outputs reach torch through DLPack without a copy (DALI's dynamic executor never
recycles an output that is still referenced); the NHWC batch is the
channels_last layout of the NCHW view handed out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from pipeline import augment
from pipeline.batch import Batch
from pipeline.reader import EncodedBatch, encoded_batches, extra_text
from pipeline.stream import FeedStream

log = logging.getLogger("pipeline")

try:
    from nvidia.dali import Pipeline, fn, types
    from nvidia.dali.backend import TensorCPU, TensorListCPU

    DALI_ERROR = None
except ImportError as exc:  # the package works without DALI; only these backends need it
    DALI_ERROR = exc

# name -> (DALI dtype name, sample ndim) of the per-sample augmentation inputs
_PARAM_TYPES = {"crop": ("FLOAT", 1), "pad_anchor": ("FLOAT", 1), "angle": ("FLOAT", 0),
                "offset": ("FLOAT", 1), "colour": ("FLOAT", 1), "hflip": ("INT32", 0),
                "vflip": ("INT32", 0)}  # fmt: skip


class DaliUnavailable(RuntimeError):
    """DALI is not installed (or a GPU backend was requested without a GPU)."""


class DecodeError(RuntimeError):
    """Every image of a batch failed to decode: nothing valid to stand in."""


# With hand_over="auto", batches of images up to this size on average (shard bytes per
# sample) reach DALI from the reader process as one buffer that DALI cuts into images (see
# _feed); larger ones image by image. The cut copies each image on DALI's threads: cheaper
# than the ~2.5 us of GIL an image costs handed over alone when images are small; for
# photos on the CPU backend, whose decode threads pay for that copy, it cost a proxy
# training step 4% on 2 cores (ImageNet sample, 114 KB per image). On a GPU the node's
# cores absorb the copy and the GIL is what the training loop shares: every batch goes as
# one buffer there (the GPU suite also times hand_over="files").
PACKED_UP_TO = 32 << 10

# Batches in DALI at once. With one, its threads wait while Python takes a batch's
# output and feeds the next (a tenth of the time for small images on 2 cores).
_IN_FLIGHT = 2


class _Running:
    """A batch fed to DALI: scheduled, then collected (its output, or why it failed)."""

    __slots__ = ("enc", "params", "out", "reason")

    def __init__(self, enc: EncodedBatch, params) -> None:
        self.enc, self.params = enc, params
        self.out = self.reason = None  # one of them is set once collected

    def collect(self, pipe) -> None:
        """Take this batch's output from PIPE (outputs come in the order scheduled)."""
        if self.out is not None or self.reason is not None:
            return
        try:
            (self.out,) = pipe.outputs()
        except RuntimeError as exc:
            self.reason = _reason(exc)


def _reason(exc: BaseException) -> str:
    """The operator's own words from a DALI error (after the graph's traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1 :]
    said = [ln for ln in lines if ln and "pipeline object is no longer valid" not in ln
            and not ln.startswith("Critical error")]  # fmt: skip
    text = " ".join(said).rstrip(" :")
    return f"DALI's decoder refused it ({text})" if text else "DALI's decoder refused it"


def feed_batches(cfg, job) -> Iterator[tuple[EncodedBatch, augment.BatchParams | None]]:
    """Encoded batches of JOB with their augmentation, read in threads of this process."""
    # Images as views of the buffers they were read into: DALI reads them in place, and
    # the batch (its _Running) keeps them alive until DALI is done with it.
    source = encoded_batches(job, views=True)
    try:
        for enc in source:
            yield enc, augment.draw(cfg, enc.key_hash, job.epoch, enc.width, enc.height)
    finally:
        source.close()


class DaliBackend:
    """Decode + augment with DALI on the CPU or the GPU (``cfg.backend``)."""

    builds = 0  # DALI pipelines built in this process (one per loader: the tests count them)

    def __init__(self, cfg, world, device: torch.device, sample_bytes: float | None = None
                 ) -> None:  # fmt: skip
        if DALI_ERROR is not None:
            raise DaliUnavailable(
                f"backend {cfg.backend!r} needs NVIDIA DALI ({DALI_ERROR}); install it with "
                "pip install -e '.[dali]' or use backend='torch'"
            )
        from pipeline.dali_graph import params_used

        self.cfg = cfg
        self.world = world
        self.device = device
        self.dali_device = "gpu" if cfg.backend == "dali-gpu" else "cpu"
        self.dtype = getattr(torch, cfg.dtype)
        self.params = params_used(cfg)
        self._pipe = None
        self._stream = None  # pipeline.stream.FeedStream: the feeder, run on between epochs
        self._reader = None  # pipeline.readerproc.ReaderProcess, started with the first epoch
        self._threaded = False  # decided once: the reader runs in threads of this process
        self.sample_bytes = sample_bytes  # the dataset's shard bytes per sample (PACKED_UP_TO)
        self._packed = False  # the graph takes each batch's images as one buffer (see _feed)
        self.build_s = 0.0

    # -- the pipeline, built once ------------------------------------------------------
    def pipeline(self):
        if self._pipe is not None:
            return self._pipe
        from pipeline.dali_graph import build_graph

        t = time.perf_counter()
        gpu = self.dali_device == "gpu"
        # The reader process hands each batch's images over in one buffer: DALI gets that
        # buffer and each image's span, and cuts the images out in its own threads.
        small = self.sample_bytes is not None and self.sample_bytes <= PACKED_UP_TO
        mode = self.cfg.hand_over
        self._packed = self._use_process() and (
            mode == "buffer" or (mode == "auto" and (gpu or small))
        )
        pipe = Pipeline(
            batch_size=self.cfg.batch_size,
            num_threads=self.cfg.num_threads,
            device_id=(self.device.index or 0) if gpu else None,
            # Fed explicitly, one batch per run: the feeder thread is what runs ahead.
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
            if self._packed:
                span = fn.external_source(name="span", dtype=types.INT64, ndim=1)
                encoded = fn.slice(encoded, span[0:1], span[1:2], axes=[0])
            nodes = {}
            for name in self.params:
                dtype, ndim = _PARAM_TYPES[name]
                nodes[name] = fn.external_source(name=name, dtype=getattr(types, dtype), ndim=ndim)
            pipe.set_outputs(build_graph(encoded, self.cfg, self.dali_device, nodes))
        pipe.build()
        self._pipe = pipe
        DaliBackend.builds += 1
        self.build_s = time.perf_counter() - t
        return pipe

    def _feed(self, enc: EncodedBatch, params: augment.BatchParams | None, rows=None) -> None:
        pipe = self._pipe
        # DALI reads the bytes in place (no_copy): they stay where they are until the batch
        # is out of DALI.
        if self._packed:
            # The batch's one buffer, as every sample, and each sample's span in it: the
            # training process handles two objects per batch, not one per image (feed_input
            # costs ~1 us of GIL per list item: a quarter to a half of the feeder's time).
            buffer, span = enc.packed  # every batch of the reader process has it
            span = span if rows is None else span[rows]
            pipe.feed_input("encoded", TensorListCPU.broadcast(TensorCPU(buffer, ""), len(span)))
            pipe.feed_input("span", span)
        else:
            images = enc.images if rows is None else [enc.images[i] for i in rows]
            pipe.feed_input(
                "encoded", [TensorCPU(np.frombuffer(b, dtype=np.uint8), "") for b in images]
            )
        for name in self.params:
            values = getattr(params, name)
            pipe.feed_input(name, values if rows is None else values[rows])

    def _schedule(self, enc: EncodedBatch, params, rows=None) -> None:
        self._feed(enc, params, rows)
        self._pipe.schedule_run()

    def _run_now(self, enc: EncodedBatch, params, rows=None):
        """ENC's output, run alone (nothing else in flight)."""
        self._schedule(enc, params, rows)
        (out,) = self._pipe.outputs()
        return out

    def _decoded(self, source) -> Iterator[tuple[EncodedBatch, object]]:
        """(batch, DALI output) for each batch of SOURCE, in order, with _IN_FLIGHT batches
        in DALI at once: its threads decode the next batch while this one is handed out."""
        running: deque[_Running] = deque()
        try:
            for enc, params in source:
                self._schedule(enc, params)
                running.append(_Running(enc, params))
                if len(running) >= _IN_FLIGHT:
                    yield self._finish(running)
            while running:
                yield self._finish(running)
        finally:
            for r in running:  # an epoch left early: its outputs must not reach the next
                r.collect(self._pipe)

    def _finish(self, running: deque[_Running]) -> tuple[EncodedBatch, object]:
        r = running.popleft()
        r.collect(self._pipe)
        if r.reason is None:
            return r.enc, r.out
        for later in running:  # the search below runs alone: take what is in flight first
            later.collect(self._pipe)
        return self._recover(r.enc, r.params, r.reason)

    def _recover(self, enc: EncodedBatch, params, reason: str):
        """ENC failed to decode: find the images the decoder rejects (see the module
        doc), replace them, run the batch again."""
        bad = []
        for i in range(len(enc.keys)):  # which images: the same decoder, one at a time
            try:
                self._run_now(enc, params, rows=[i])
            except RuntimeError:
                bad.append(i)
        good = next((i for i in range(len(enc.keys)) if i not in bad), None)
        if good is None:
            raise DecodeError(f"no image of batch {enc.step} can be decoded ({reason}): {enc.keys}")
        if not bad:
            raise RuntimeError(
                f"DALI failed on batch {enc.step} but on none of its images alone: {reason}"
            )
        enc = enc.replaced(bad, good, reason)
        if params is not None:
            index = np.arange(len(enc.keys))
            index[bad] = good
            params = params.rows(index)
        return enc, self._run_now(enc, params)

    def _to_torch(self, out) -> torch.Tensor:
        # DALI's dynamic executor allocates every output afresh and never recycles memory
        # that is still referenced; the DLPack capsule keeps the TensorList alive, so the
        # zero-copy view stays valid after later runs (tests/pipeline/test_loader.py checks).
        nhwc = torch.from_dlpack(out.as_tensor())
        nchw = nhwc.permute(0, 3, 1, 2)  # NHWC memory == NCHW in channels_last format
        return nchw.to(self.device, self.dtype, non_blocking=True)

    def _labels(self, labels: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(labels)
        if self.device.type == "cuda":
            t = t.pin_memory()  # the copy to the GPU is then asynchronous
        return t.to(self.device, non_blocking=True)

    def _batch(self, enc, out) -> Batch:
        return Batch(self._to_torch(out), self._labels(enc.labels), enc.keys, enc.skipped,
                     extra_text(enc.extra, self.cfg.extra_members))  # fmt: skip

    # -- epochs ------------------------------------------------------------------------
    def _use_process(self) -> bool:
        if self.cfg.reader == "thread" or self.cfg.data is None or self._threaded:
            return False
        from pipeline.mainguard import unguarded_top_level_line

        unguarded = unguarded_top_level_line()
        if unguarded is None:
            return True
        script, line = unguarded
        if self.cfg.reader == "process":
            from pipeline.torch_backend import WorkerStartError

            raise WorkerStartError(
                f"{script}:{line} iterates a loader with reader='process' from top-level "
                "code: the reader process starts by importing the script, which would run "
                'that code again. Put that code under `if __name__ == "__main__":`, or use '
                "reader='thread'"
            )
        log.warning("%s:%d iterates the loader from top-level code, so the shard reader runs "
                    "in threads of this process (a process of its own needs the code under "
                    '`if __name__ == "__main__":`)', script, line)  # fmt: skip
        self._threaded = True
        return False

    def _start_reader(self) -> None:
        # On the training thread: _use_process looks at the caller's code.
        if self._reader is None and self._use_process():
            from pipeline.readerproc import ReaderProcess

            # a slot per batch in DALI, and one for the reader to fill meanwhile
            slots = max(_IN_FLIGHT + 1, self.cfg.prefetch + 1)
            # Unpacked batches of local shards reach DALI as views of the shard files
            # (mapped here too): the images are not copied anywhere (the reader process
            # alone, ImageNet photos: ~25k -> ~42k samples/s).
            self._reader = ReaderProcess(self.cfg, slots=slots, share_files=not self._packed)

    def _source(self, job):
        """JOB's inputs: (encoded batch, augmentation) in order (the stream's INPUTS)."""
        if self._reader is not None:
            # A batch's bytes stay in place until it is out of DALI: a batch that fails to
            # decode is fed again, image by image.
            return self._reader.batches(job, keep=_IN_FLIGHT)
        return feed_batches(self.cfg, job)

    def _finished(self, inputs) -> Iterator[Batch]:
        """The finished batch of each input (the stream's FINISH)."""
        with contextlib.closing(self._decoded(inputs)) as decoded:
            for enc, out in decoded:
                yield self._batch(enc, out)

    def batches(self, job) -> Iterator[Batch]:
        self.pipeline()
        self._start_reader()
        stream = self._stream
        if stream is None or not stream.accept(job):
            self._stop_stream()
            stream = self._stream = FeedStream(job, self._source, self._finished,
                                               depth=self.cfg.prefetch, name="dali-feeder")  # fmt: skip
        try:
            yield from stream.take(job)
        finally:
            if not stream.whole:  # left early: what the stream made next is not wanted
                self._stop_stream()

    def wait_ahead(self, timeout: float = 60.0) -> None:
        """Wait until the feeder has made what it makes ahead of the training loop (see
        FeedStream.wait_ahead)."""
        if self._stream is not None:
            self._stream.wait_ahead(timeout)

    def _stop_stream(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream = None

    def close(self) -> None:
        self._stop_stream()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._pipe = None
