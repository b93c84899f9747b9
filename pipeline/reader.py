"""From a rank's plan to batches of encoded samples, in the planned order.

The reader fetches the rank's pending inputs in input order (whole shards or
sub-ranges, ``read_ahead`` read units ahead: in background threads, or, for
local shards mapped by the reader process, by the kernel's read-ahead) and hands
them out in the shuffled output order; by construction of the shuffle-buffer
plan it never holds more than about ``shuffle_buffer`` samples. Each read unit is
held as columns (:mod:`pipeline.columns`) and each batch gathered from them with
array indexing. Every image's bytes are checked (:mod:`pipeline.sanity`); a
corrupt sample is replaced by the first valid sample of its batch, so shapes and
step counts never change, and its key is reported.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import columns
from pipeline.columns import Columns

log = logging.getLogger("pipeline")


class CorruptDataError(RuntimeError):
    """No valid image to stand in for a corrupt one."""


@dataclass(frozen=True, kw_only=True)
class EncodedBatch:
    """One step's samples, corrupt ones already replaced."""

    step: int
    keys: list[str]
    images: list[bytes] | None  # None: read them at ``origin``
    labels: np.ndarray  # int64 [B]
    skipped: tuple[str, ...]
    key_hash: np.ndarray | None = None  # uint64 [B]: augment.key_hashes of the keys
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
        keys, labels = list(self.keys), self.labels.copy()
        key_hash = self.key_hash.copy() if self.key_hash is not None else None
        images = list(self.images) if self.images is not None else None
        extra = list(self.extra) if self.extra is not None else None
        width = self.width.copy() if self.width is not None else None
        height = self.height.copy() if self.height is not None else None
        for i in bad:
            log.warning("skipping undecodable sample %s: %s", self.keys[i], reason)
            keys[i], labels[i] = keys[good], labels[good]
            if key_hash is not None:
                key_hash[i] = key_hash[good]
            if images is not None:
                images[i] = images[good]
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
                            skipped=skipped, key_hash=key_hash, extra=extra, width=width, height=height,
                            packed=packed, origin=origin)  # fmt: skip


def _units(shard: np.ndarray, max_samples) -> list[tuple[int, int, int]]:
    """Split the input run into read units: consecutive inputs of one shard, bounded in size
    (MAX_SAMPLES(shard): samples per read). (shard, lo, hi): inputs lo..hi of the run."""
    out: list[tuple[int, int, int]] = []
    if len(shard) == 0:
        return out
    brk = np.flatnonzero(np.diff(shard) != 0) + 1
    for a, b in zip([0, *brk.tolist()], [*brk.tolist(), len(shard)], strict=True):
        step = max_samples(int(shard[a]))
        out.extend((int(shard[a]), lo, min(lo + step, b)) for lo in range(a, b, step))
    return out


class InputReader:
    """Reads input positions POSITIONS (sorted) of a RankOrder, unit by unit (``units``):
    yields one pipeline.columns.Columns per unit, its rows in input order."""

    def __init__(self, dataset, ranks_order, positions: np.ndarray, read_ahead: int) -> None:
        self.dataset = dataset
        self.ro = ranks_order
        self.positions = positions
        self.read_ahead = read_ahead
        self.units = _units(ranks_order.shard[positions], self.max_samples)
        self._pool: ThreadPoolExecutor | None = None

    def max_samples(self, shard: int) -> int:
        """Samples of SHARD per read of at most max_read_bytes (from its average size)."""
        shards = self.dataset.manifest.shards
        avg = max(1, int(shards.bytes[shard]) // max(1, int(shards.samples[shard])))
        return max(1, self.dataset.max_read_bytes // avg)

    def _indices(self, lo: int, hi: int) -> np.ndarray:
        return self.ro.index[self.positions[lo:hi]]

    def _read_unit(self, shard: int, lo: int, hi: int) -> Columns:
        idx = self._indices(lo, hi)
        order = np.argsort(idx, kind="stable")  # reads want ascending offsets
        cols = self.dataset.read_columns(shard, idx[order])
        if (order[1:] < order[:-1]).any():  # back to input order
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            cols = columns.take(cols, back)
        return cols

    def __iter__(self) -> Iterator[Columns]:
        units = self.units
        if self.read_ahead == 0:
            for unit in units:
                yield self._read_unit(*unit)
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
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _mapped(self, units) -> Iterator[Columns]:
        """Local shards the dataset maps (Dataset.mapped) are read here, in order: the
        kernel reads the next read_ahead units meanwhile (Dataset.will_need). A mapping
        makes no system call that would let another thread run, so read-ahead threads
        would only hand the GIL back and forth: a quarter of the reader process's speed
        from the page cache. Reads that copy (read system calls, object storage) keep
        their threads, which run while a read waits."""
        for i, unit in enumerate(units):
            if i == 0:
                for first in units[: self.read_ahead + 1]:
                    self.dataset.will_need(first[0], self._indices(*first[1:]))
            elif i + self.read_ahead < len(units):
                ahead = units[i + self.read_ahead]
                self.dataset.will_need(ahead[0], self._indices(*ahead[1:]))
            yield self._read_unit(*unit)


def encoded_batches(job, views: bool = False, origins: bool = False) -> Iterator[EncodedBatch]:
    """Batches of steps ``job.start..`` of the job's plan, in the planned order.

    VIEWS: images are memoryviews of the buffers they were read into, not copies, for
    a consumer that copies them once anyway (into shared memory, or into DALI). A
    buffer lives while any view of it does: read units whose last samples wait long in
    the shuffle buffer get those samples' bytes copied out (see _Held), so a few
    stragglers never keep whole reads in memory.

    ORIGINS: a batch whose images all lie in mapped shard files says where
    (EncodedBatch.origin) and carries no images (None), for a consumer that reads them
    there. Nothing is copied out then: a view of a mapped shard pins no memory of this
    process, only a range of the page cache.
    """
    plan = job.plan
    ro = plan.ranks_order
    b = plan.batch_size
    pending = ro.pending(job.start * b)
    reader = InputReader(job.dataset, ro, pending, job.cfg.read_ahead)
    window = _VIEW_WINDOW_BUFFERS * max(b, job.cfg.shuffle_buffer)
    held = _Held(reader, window if views else None, origins)
    names = job.dataset.shard_names
    last_valid: tuple[Columns, int] | None = None
    try:
        for step in range(job.start, plan.steps):
            k = np.searchsorted(pending, ro.order[step * b : (step + 1) * b])
            unit, row = held.locate(k)
            got = _Gathered(held, unit, row, views, origins)
            where = lambda i, k=k: _where(ro, names, pending[k[i]])  # noqa: E731
            batch, last_valid = got.batch(step, last_valid, where)
            held.taken(unit, row)
            yield batch
    finally:
        held.close()


def _where(ro, names, inp) -> str:
    return f"{names[int(ro.shard[inp])]}#{int(ro.index[inp])}"


# A sample's wait in a shuffle buffer of B slots is geometric with mean B outputs, so a
# read's samples still held 2B inputs after it are ~14% of them: that is when they are
# copied out (and their read's buffer freed). The buffers then hold about twice what the
# shuffle buffer does, instead of one copy of it.
_VIEW_WINDOW_BUFFERS = 2


class _Held:
    """The read units with samples not yet output, read from READER as batches need them.
    With a WINDOW, a unit more than WINDOW inputs behind the latest one read keeps only
    its samples still to come, in a buffer of their own; with ORIGINS, not a unit of a
    mapped shard, whose samples go by origin (its mapping pins only page cache)."""

    def __init__(self, reader: InputReader, window: int | None, origins: bool = False) -> None:
        self.window = window
        self.origins = origins
        self.units = reader.units
        self.starts = np.array([lo for _, lo, _ in reader.units], dtype=np.int64)
        self._source = iter(reader)
        self.read = 0  # units read so far
        self.cols: dict[int, Columns] = {}
        self.left: dict[int, np.ndarray] = {}  # unit -> rows not yet output (bool)
        self.owned: set[int] = set()  # units whose rows have bytes of their own

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unit, row) of each pending input K, reading on until all of them are in."""
        unit = np.searchsorted(self.starts, k, side="right") - 1
        need = int(unit.max()) if len(unit) else -1
        while self.read <= need:
            cols = next(self._source)
            self.cols[self.read] = cols
            self.left[self.read] = np.ones(len(cols), dtype=bool)
            self.read += 1
        return unit, k - self.starts[unit]

    def taken(self, unit: np.ndarray, row: np.ndarray) -> None:
        """Rows ROW of UNIT were output: units with none left are dropped."""
        for u in np.unique(unit).tolist():
            left = self.left[u]
            left[row[unit == u]] = False
            if not left.any():
                del self.cols[u], self.left[u]
                self.owned.discard(u)
        if self.window is None or not self.cols:
            return
        limit = self.units[self.read - 1][1] - self.window
        for u, cols in self.cols.items():
            if u not in self.owned and self.units[u][2] <= limit:
                if not (self.origins and cols.origin is not None):
                    cols.keep_only(np.flatnonzero(self.left[u]))
                self.owned.add(u)

    def close(self) -> None:
        self._source.close()  # type: ignore[attr-defined]
        self.cols.clear()


class _Gathered:
    """A batch's rows, gathered from the read units holding them."""

    def __init__(self, held: _Held, unit: np.ndarray, row: np.ndarray, views: bool,
                 origins: bool) -> None:  # fmt: skip
        self.views = views
        n = len(unit)
        parts = np.unique(unit).tolist()
        cols = [held.cols[u] for u in parts]
        self.origin = None
        self.images: list | None = None
        self.stand_ins: dict[int, tuple[Columns, int]] = {}
        if len(cols) == 1:  # the rule when read units are large against the shuffle buffer
            sel = [np.arange(n)]
            rows = [row]
        else:
            sel = [np.flatnonzero(unit == u) for u in parts]
            rows = [row[s] for s in sel]
        self.sel, self.rows, self.parts = sel, rows, cols

        def gather(name, dtype):
            first = getattr(cols[0], name)
            if len(cols) == 1:
                return first[row]
            out = np.empty(n, dtype=dtype)
            for c, s, r in zip(cols, sel, rows, strict=True):
                out[s] = getattr(c, name)[r]
            return out

        self.keys = gather("keys", object)
        self.label = gather("label", np.int64)
        self.key_hash = gather("key_hash", np.uint64)
        self.width = gather("width", np.int32)
        self.height = gather("height", np.int32)
        self.extra = None
        if cols[0].extra is not None:
            extra: list = [None] * n
            for c, s, r in zip(cols, sel, rows, strict=True):
                for i, j in zip(s.tolist(), r.tolist(), strict=True):
                    extra[i] = c.extra[j]  # type: ignore[index]
            self.extra = extra
        if origins and all(c.origin is not None for c in cols):
            origin = np.empty((n, 3), dtype=np.int64)
            for c, s, r in zip(cols, sel, rows, strict=True):
                origin[s, 0] = c.shard
                origin[s, 1] = c.origin[r]  # type: ignore[index]
                origin[s, 2] = c.size[r]
            self.origin = origin
        else:
            self.images = cols[0].images(row, views) if len(cols) == 1 else self._images()
        bad = []
        for c, s, r in zip(cols, sel, rows, strict=True):
            if c.problems:
                bad.extend(
                    i for i, j in zip(s.tolist(), r.tolist(), strict=True) if j in c.problems
                )
        self.bad = sorted(bad)

    def _source(self, i: int) -> tuple[Columns, int]:
        for c, s, r in zip(self.parts, self.sel, self.rows, strict=True):
            hit = np.flatnonzero(s == i)
            if len(hit):
                return c, int(r[hit[0]])
        raise AssertionError("unreachable")

    def batch(
        self, step: int, last_valid, where
    ) -> tuple[EncodedBatch, tuple[Columns, int] | None]:
        keys = self.keys.tolist()
        skipped = []
        n = len(keys)
        if self.bad:
            bad = set(self.bad)
            good = next((i for i in range(n) if i not in bad), None)
            stand_in = self._source(good) if good is not None else last_valid
            for i in self.bad:
                c, row = self._source(i)
                why = c.problems[row]
                log.warning("skipping corrupt sample %s (%s): %s", keys[i], where(i), why)
                skipped.append(keys[i])
                if stand_in is None:
                    raise CorruptDataError(
                        f"sample {keys[i]} ({where(i)}) is corrupt ({why}) and no valid sample "
                        "has been read yet to stand in for it"
                    )
                self._replace(i, *stand_in, keys)
            last = next((i for i in reversed(range(n)) if i not in bad), None)
            last_valid = self._source(last) if last is not None else last_valid
        elif n:
            last_valid = self._source(n - 1)
        batch = EncodedBatch(step=step, keys=keys, images=self.images, labels=self.label,
                             skipped=tuple(skipped), key_hash=self.key_hash, extra=self.extra,
                             width=self.width, height=self.height, origin=self.origin)  # fmt: skip
        return batch, last_valid

    def _replace(self, i: int, c: Columns, r: int, keys: list) -> None:
        keys[i] = c.keys[r]
        self.label[i], self.width[i], self.height[i] = c.label[r], c.width[r], c.height[r]
        self.key_hash[i] = c.key_hash[r]
        if self.extra is not None:
            self.extra[i] = c.extra[r] if c.extra is not None else None
        self.stand_ins[i] = (c, r)
        if self.images is not None:
            self.images[i] = c.images(np.array([r]), self.views)[0]
        elif c.origin is not None:
            self.origin[i] = (c.shard, c.origin[r], c.size[r])  # type: ignore[index]
        else:  # a stand-in from a shard that is not mapped: this batch goes as images
            self.origin = None
            self.images = self._images()

    def _images(self) -> list:
        """Every row's image, stand-ins included."""
        images: list = [None] * len(self.keys)
        for c, s, r in zip(self.parts, self.sel, self.rows, strict=True):
            for i, im in zip(s.tolist(), c.images(r, self.views), strict=True):
                images[i] = im
        for i, (c, r) in self.stand_ins.items():
            images[i] = c.images(np.array([r]), self.views)[0]
        return images


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
