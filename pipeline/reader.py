"""From a rank's plan to batches of encoded samples, in the planned order.

The reader fetches the rank's pending inputs in input order (whole shards or
sub-ranges, ``read_ahead`` read units ahead: in background threads, or, for
local shards mapped by the reader process, by the kernel's read-ahead) and hands
them out in the shuffled output order; by construction of the shuffle-buffer
plan it never holds more than about ``shuffle_buffer`` samples. Every image's
bytes are checked (:mod:`pipeline.sanity`); a corrupt sample is replaced by the
first valid sample of its batch, so shapes and step counts never change, and
its key is reported.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.sanity import inspect_image
from shard_tools.format import RawSample

log = logging.getLogger("pipeline")


class CorruptDataError(RuntimeError):
    """No valid image to stand in for a corrupt one."""


@dataclass(slots=True)  # not frozen: a frozen dataclass is built 4x slower, per sample
class Sample:
    """A sample ready for a decoder: its image bytes, label and any problem found."""

    key: str
    image: bytes
    label: int
    problem: str | None
    extra: dict[str, bytes] | None = None
    width: int = 0  # from the image's header (a random resized crop needs it)
    height: int = 0
    # Where the image lies in its shard file (reading with origins): shard, byte offset.
    shard: int = -1
    at: int = -1


@dataclass(frozen=True, kw_only=True)
class EncodedBatch:
    """One step's samples, corrupt ones already replaced."""

    step: int
    keys: list[str]
    images: list[bytes]
    labels: np.ndarray  # int64 [B]
    skipped: tuple[str, ...]
    extra: list[dict[str, bytes] | None] | None = None  # per sample (extra_members)
    width: np.ndarray | None = None  # int32 [B], from each image's header
    height: np.ndarray | None = None
    # The images as one buffer: (uint8 bytes, int64 [B, 2] offset and size of each image
    # in it), where they arrived that way (the reader process's shared memory).
    packed: tuple[np.ndarray, np.ndarray] | None = None
    # Where each image lies in the shard files: int64 [B, 3] (shard, byte offset, size),
    # when all of them do (encoded_batches' origins): the reader process then hands the
    # batch over as these spans, not as bytes.
    origin: np.ndarray | None = None

    def replaced(self, bad: list[int], good: int, reason: str) -> EncodedBatch:
        """This batch with rows BAD standing in for by row GOOD (images that failed to
        decode), their keys reported as skipped."""
        keys, images, labels = list(self.keys), list(self.images), self.labels.copy()
        extra = list(self.extra) if self.extra is not None else None
        width = self.width.copy() if self.width is not None else None
        height = self.height.copy() if self.height is not None else None
        for i in bad:
            log.warning("skipping undecodable sample %s: %s", self.keys[i], reason)
            keys[i], images[i], labels[i] = keys[good], images[good], labels[good]
            if extra is not None:
                extra[i] = extra[good]
            if width is not None:
                width[i], height[i] = width[good], height[good]
        packed = self.packed
        if packed is not None:
            span = packed[1].copy()
            span[bad] = span[good]
            packed = (packed[0], span)
        origin = self.origin
        if origin is not None:
            origin = origin.copy()
            origin[bad] = origin[good]
        skipped = self.skipped + tuple(self.keys[i] for i in bad)
        return EncodedBatch(step=self.step, keys=keys, images=images, labels=labels,
                            skipped=skipped, extra=extra, width=width, height=height,
                            packed=packed, origin=origin)  # fmt: skip


def to_sample(raw: RawSample, labelled: bool = True, checked=None) -> Sample:
    """Parse the label and check the image bytes; record what is wrong, if anything.
    An unlabelled dataset's samples get label -1 and need no .cls. CHECKED: the image's
    verdict if it was checked already (Dataset.read_inspected)."""
    problem = None
    label = -1
    if isinstance(raw.label, int):  # given by an adopted dataset's .labels
        label = raw.label
    elif not labelled:
        pass
    elif raw.label is None:
        problem = "sample has no .cls label"
    else:
        try:
            label = int(raw.label)
        except ValueError:
            problem = "label (.cls) is not an integer"
    if raw.image is None:
        return Sample(raw.key, b"", label, "sample has no jpg/png/webp image", raw.extra)
    bad, (width, height) = checked if checked is not None else inspect_image(raw.image)
    return Sample(raw.key, raw.image, label, problem or bad, raw.extra, width, height)


def _units(shard: np.ndarray, positions: np.ndarray, max_samples):
    """Split the input run into read units: consecutive inputs of one shard, bounded in size
    (MAX_SAMPLES(shard): samples per read)."""
    if len(shard) == 0:
        return
    brk = np.flatnonzero(np.diff(shard) != 0) + 1
    for a, b in zip(np.concatenate([[0], brk]), np.concatenate([brk, [len(shard)]]), strict=True):
        step = max_samples(int(shard[a]))
        for lo in range(int(a), int(b), step):
            yield int(shard[a]), positions[lo : min(lo + step, int(b))]


class InputReader:
    """Reads input positions POSITIONS (sorted) of a RankOrder; yields (position, Sample)."""

    def __init__(self, dataset, ranks_order, positions: np.ndarray, read_ahead: int,
                 views: bool = False, origins: bool = False) -> None:  # fmt: skip
        self.dataset = dataset
        self.ro = ranks_order
        self.positions = positions
        self.read_ahead = read_ahead
        self.views = views  # images as memoryviews of their read's buffer
        self.origins = origins  # note where each image lies in its file, where it can be
        self._pool: ThreadPoolExecutor | None = None

    def max_samples(self, shard: int) -> int:
        """Samples of SHARD per read of at most max_read_bytes (from its average size)."""
        shards = self.dataset.manifest.shards
        avg = max(1, int(shards.bytes[shard]) // max(1, int(shards.samples[shard])))
        return max(1, self.dataset.max_read_bytes // avg)

    def _read_unit(self, shard: int, pos: np.ndarray) -> list[tuple[int, Sample]]:
        idx = self.ro.index[pos]
        order = np.argsort(idx, kind="stable")  # reads want ascending offsets
        raws, checks = self.dataset.read_inspected(shard, idx[order], views=self.views)
        out: list[tuple[int, Sample] | None] = [None] * len(pos)
        labelled = self.dataset.labelled
        for o, raw, checked in zip(order.tolist(), raws, checks, strict=True):
            out[o] = (int(pos[o]), to_sample(raw, labelled, checked))
        at = self.dataset.image_offsets(shard, idx) if self.origins else None
        if at is not None:
            for (_, sample), a in zip(out, at.tolist(), strict=True):  # type: ignore[misc]
                sample.shard, sample.at = shard, a
        return out  # type: ignore[return-value]

    def __iter__(self) -> Iterator[tuple[int, Sample]]:
        units = _units(self.ro.shard[self.positions], self.positions, self.max_samples)
        if self.read_ahead == 0:
            for shard, pos in units:
                yield from self._read_unit(shard, pos)
            return
        if self.dataset.mapped:
            yield from self._mapped(units)
            return
        self._pool = ThreadPoolExecutor(self.read_ahead, thread_name_prefix="shard-read")
        pending: deque[Future] = deque()
        try:
            for unit in units:
                pending.append(self._pool.submit(self._read_unit, *unit))
                if len(pending) > self.read_ahead:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _mapped(self, units) -> Iterator[tuple[int, Sample]]:
        """Local shards the dataset maps (Dataset.mapped) are read here, in order: the
        kernel reads the next read_ahead units meanwhile (Dataset.will_need). A mapping
        makes no system call that would let another thread run, so read-ahead threads
        would only hand the GIL back and forth: a quarter of the reader process's speed
        from the page cache. Reads that copy (read system calls, object storage) keep
        their threads, which run while a read waits."""
        ahead: deque[tuple[int, np.ndarray]] = deque()
        units = iter(units)
        while True:
            while len(ahead) <= self.read_ahead:
                unit = next(units, None)
                if unit is None:
                    break
                shard, pos = unit
                self.dataset.will_need(shard, self.ro.index[pos])
                ahead.append(unit)
            if not ahead:
                return
            yield from self._read_unit(*ahead.popleft())


def encoded_batches(job, views: bool = False, origins: bool = False) -> Iterator[EncodedBatch]:
    """Batches of steps ``job.start..`` of the job's plan, in the planned order.

    VIEWS: images are memoryviews of the buffers they were read into, not copies, for
    a consumer that copies them once anyway (into shared memory, or into DALI). A
    buffer lives while any view of it does: samples that wait long in the shuffle
    buffer are copied out (see _Held), so a few stragglers never keep whole reads in
    memory.

    ORIGINS: each batch also says where its images lie in the shard files
    (EncodedBatch.origin), where the dataset maps them (Dataset.image_offsets), for a
    consumer that reads them there. Nothing is copied out then: a view of a mapped
    shard pins no memory of this process, only a range of the page cache.
    """
    plan = job.plan
    ro = plan.ranks_order
    b = plan.batch_size
    pending = ro.pending(job.start * b)
    reader = iter(InputReader(job.dataset, ro, pending, job.cfg.read_ahead, views=views,
                              origins=origins))  # fmt: skip
    window = _VIEW_WINDOW_BUFFERS * max(b, job.cfg.shuffle_buffer)
    held = _Held(window if views and not origins else None)
    names = job.dataset.shard_names
    last_valid: Sample | None = None
    try:
        for step in range(job.start, plan.steps):
            samples = [(inp, held.take(inp, reader))
                       for inp in ro.order[step * b : (step + 1) * b].tolist()]  # fmt: skip
            held.compact()
            batch, last_valid = _make_batch(step, samples, last_valid, ro, names, origins)
            yield batch
    finally:
        reader.close()


# A sample's wait in a shuffle buffer of B slots is geometric with mean B outputs, so a
# read's samples still held 2B inputs after it are ~14% of them: that is when they are
# copied out (and their read's buffer freed). The buffers then hold about twice what the
# shuffle buffer does, instead of one copy of it.
_VIEW_WINDOW_BUFFERS = 2


class _Held:
    """Samples read and not yet output, by input position. With a WINDOW, those whose
    images are views of a read's buffer and lie more than WINDOW inputs behind the
    latest read get images of their own (compact)."""

    def __init__(self, window: int | None) -> None:
        self.window = window
        self.young: dict[int, Sample] = {}  # in input order (positions are read ascending)
        self.old: dict[int, Sample] = {}  # images of their own
        self.latest = -1

    def take(self, pos: int, reader: Iterator[tuple[int, Sample]]) -> Sample:
        """The sample of input POS, reading on from READER until it has come."""
        found = self.young.pop(pos, None)
        if found is None:
            found = self.old.pop(pos, None)
        while found is None:
            got, sample = next(reader)
            self.latest = got
            if got == pos:
                return sample
            self.young[got] = sample
        return found

    def compact(self) -> None:
        if self.window is None:
            return
        limit = self.latest - self.window
        stale = []
        for pos in self.young:  # oldest first; stops at the first recent one
            if pos >= limit:
                break
            stale.append(pos)
        for pos in stale:
            s = self.young.pop(pos)
            if isinstance(s.image, memoryview):
                s.image = bytes(s.image)
            self.old[pos] = s


def _make_batch(step, samples, last_valid, ro, names, origins: bool = False
                ) -> tuple[EncodedBatch, Sample | None]:  # fmt: skip
    valid = [s for _, s in samples if s.problem is None]
    stand_in = valid[0] if valid else last_valid
    skipped = []
    out = []
    for inp, s in samples:
        if s.problem is None:
            out.append(s)
            continue
        where = f"{names[int(ro.shard[inp])]}#{int(ro.index[inp])}"
        log.warning("skipping corrupt sample %s (%s): %s", s.key, where, s.problem)
        skipped.append(s.key)
        if stand_in is None:
            raise CorruptDataError(
                f"sample {s.key} ({where}) is corrupt ({s.problem}) and no valid sample has been "
                "read yet to stand in for it"
            )
        out.append(stand_in)
    origin = None
    if origins and all(s.at >= 0 for s in out):
        origin = np.array([(s.shard, s.at, len(s.image)) for s in out], dtype=np.int64)
    batch = EncodedBatch(
        step=step,
        keys=[s.key for s in out],
        images=[s.image for s in out],
        labels=np.array([s.label for s in out], dtype=np.int64),
        skipped=tuple(skipped),
        extra=[s.extra for s in out],
        width=np.array([s.width for s in out], dtype=np.int32),
        height=np.array([s.height for s in out], dtype=np.int32),
        origin=origin,
    )
    return batch, (valid[-1] if valid else last_valid)


def extra_text(per_sample: list[dict[str, bytes] | None] | None, exts: tuple[str, ...]
               ) -> dict[str, list[str | None]]:  # fmt: skip
    """Batch.extra from the members read per sample: UTF-8 text, None where absent."""
    if not exts:
        return {}
    rows = per_sample or []
    return {
        ext: [d[ext].decode("utf-8", "replace") if d and ext in d else None for d in rows]
        for ext in exts
    }
