"""Samples read together, held as columns: one array per field, not an object per sample.

The reader process handles 100,000 small samples a second in one Python thread;
at that rate every per-sample object (a tuple, a dataclass, a dict entry, a
slice) costs a measurable share of it. A read unit's samples are therefore kept
as arrays (where each image lies in the read's buffer, its label, its size from
the header, whether it is usable) built by vectorised operations over the read,
and a batch is gathered from them with fancy indexing. Python touches a sample
one by one only where something is wrong with it, or where the consumer wants
its image as an object of its own.

What a sample's bytes say (its label, its image's size and soundness, its key's
hash) cannot change while its shard does not, and shards are immutable once
written: it is worked out when a sample is first read and kept (ShardFacts), so
later epochs only gather it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.augment import key_hashes
from pipeline.sanity import inspect_image, inspect_many
from shard_tools.format import RawSample, TarFormatError

NO_IMAGE = "sample has no jpg/png/webp image"
NO_LABEL = "sample has no .cls label"
BAD_LABEL = "label (.cls) is not an integer"
BIG_LABEL = "label (.cls) does not fit in 64 bits"
INT64 = range(-(2**63), 2**63)
# Labels of up to this many ASCII digits are parsed as arrays; anything else (a sign,
# spaces, a longer number) by int() one by one, which defines what a label may be.
_DIGITS = 18
_POWERS = 10 ** np.arange(_DIGITS - 1, -1, -1, dtype=np.int64)


@dataclass(slots=True, eq=False)
class Columns:
    """N samples of one shard, in the reader's order, one array per field."""

    shard: int
    keys: np.ndarray  # object [n]: str
    bufs: list  # the buffers the images lie in (bytes, an mmap of the shard, ...)
    part: np.ndarray | None  # int32 [n]: which of bufs holds each image; None: bufs[0]
    start: np.ndarray  # int64 [n]: where each image starts in its buffer
    size: np.ndarray  # int64 [n]: its length (0: none)
    label: np.ndarray  # int64 [n]; -1 where unlabelled
    key_hash: np.ndarray  # uint64 [n]: what augmentation is drawn from (augment.key_hashes)
    width: np.ndarray  # int32 [n], from the image's header (0 where unusable)
    height: np.ndarray  # int32 [n]
    problems: dict[int, str]  # row -> why the sample cannot be used
    extra: list[dict[str, bytes] | None] | None = None  # per row, when members are asked for
    origin: np.ndarray | None = None  # int64 [n]: where each image starts in the shard file

    def __len__(self) -> int:
        return len(self.keys)

    def images(self, rows: np.ndarray, views: bool) -> list:
        """The images of ROWS: memoryviews of their buffers (VIEWS), else bytes of their own."""
        bufs = [memoryview(b).cast("B") if views else b for b in self.bufs]
        start, size = self.start[rows].tolist(), self.size[rows].tolist()
        if self.part is None:
            buf = bufs[0]
            return [buf[a : a + n] for a, n in zip(start, size, strict=True)]
        return [bufs[p][a : a + n]
                for p, a, n in zip(self.part[rows].tolist(), start, size, strict=True)]  # fmt: skip

    def keep_only(self, rows: np.ndarray) -> None:
        """Copy the images of ROWS into one buffer of their own and drop the others' bytes:
        the read buffers are freed while these few rows are still to come."""
        own = self.images(rows, views=True)
        sizes = np.zeros(len(self), dtype=np.int64)
        sizes[rows] = self.size[rows]
        start = np.zeros(len(self), dtype=np.int64)
        start[rows] = np.cumsum(sizes[rows]) - sizes[rows]
        self.bufs, self.part, self.start, self.size = [b"".join(own)], None, start, sizes


def concat(parts: list[Columns]) -> Columns:
    """The rows of PARTS (of one shard) one after another."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    bufs: list = []  # each distinct buffer once (the reads of a mapped shard share its map)
    which = []
    problems: dict[int, str] = {}
    offset = 0
    for c in parts:
        ids = []
        for b in c.bufs:
            at = next((i for i, known in enumerate(bufs) if known is b), None)
            if at is None:
                at = len(bufs)
                bufs.append(b)
            ids.append(at)
        p = np.zeros(len(c), dtype=np.int32) if c.part is None else c.part
        which.append(np.asarray(ids, dtype=np.int32)[p])
        problems.update({offset + r: why for r, why in c.problems.items()})
        offset += len(c)

    def cat(name):
        return np.concatenate([getattr(c, name) for c in parts])

    extra = None if first.extra is None else [e for c in parts for e in c.extra]  # type: ignore[union-attr]
    origin = None if any(c.origin is None for c in parts) else cat("origin")
    part = np.concatenate(which) if len(bufs) > 1 else None
    return Columns(shard=first.shard, keys=cat("keys"), bufs=bufs, part=part, start=cat("start"),
                   size=cat("size"), label=cat("label"), key_hash=cat("key_hash"),
                   width=cat("width"), height=cat("height"), problems=problems, extra=extra,
                   origin=origin)  # fmt: skip


def take(c: Columns, rows: np.ndarray) -> Columns:
    """Rows ROWS of C, in that order (a permutation of them)."""
    where = {int(r): i for i, r in enumerate(rows.tolist())} if c.problems else {}
    return Columns(shard=c.shard, keys=c.keys[rows], bufs=c.bufs,
                   part=None if c.part is None else c.part[rows], start=c.start[rows],
                   size=c.size[rows], label=c.label[rows], key_hash=c.key_hash[rows],
                   width=c.width[rows], height=c.height[rows],
                   problems={where[r]: why for r, why in c.problems.items() if r in where},
                   extra=None if c.extra is None else [c.extra[r] for r in rows.tolist()],
                   origin=None if c.origin is None else c.origin[rows])  # fmt: skip


class ShardFacts:
    """What reading samples of one shard found, by sample index: worked out once."""

    __slots__ = ("seen", "label", "key_hash", "width", "height", "bad", "reason")

    def __init__(self, samples: int) -> None:
        self.seen = np.zeros(samples, dtype=bool)
        self.label = np.full(samples, -1, dtype=np.int64)
        self.key_hash = np.zeros(samples, dtype=np.uint64)
        self.width = np.zeros(samples, dtype=np.int32)
        self.height = np.zeros(samples, dtype=np.int32)
        self.bad = np.zeros(samples, dtype=bool)
        self.reason: dict[int, str] = {}

    def learn(self, ids: np.ndarray, label, key_hash, width, height, problems: dict[int, str]
              ) -> None:  # fmt: skip
        """Record samples IDS (PROBLEMS by position in IDS)."""
        self.label[ids], self.key_hash[ids] = label, key_hash
        self.width[ids], self.height[ids] = width, height
        for r, why in problems.items():
            i = int(ids[r])
            self.bad[i] = True
            self.reason[i] = why
        self.seen[ids] = True

    def problems(self, ids: np.ndarray) -> dict[int, str]:
        """The problems of samples IDS, by position in IDS."""
        rows = np.flatnonzero(self.bad[ids])
        return {r: self.reason[i] for r, i in zip(rows.tolist(), ids[rows].tolist(), strict=True)}


def from_range(buf, buf_start: int, index, ids: np.ndarray, *, shard: int, facts: ShardFacts,
               labels, labelled: bool, extra: tuple[str, ...]) -> Columns:  # fmt: skip
    """Samples IDS (sorted) of a shard whose .idx is INDEX, out of BUF, which holds its
    bytes from offset BUF_START. Samples FACTS has not seen are worked out (each image
    checked by pipeline.sanity) and recorded there. LABELS: an adopted shard's labels of
    IDS (else its .cls members are parsed); LABELLED: a sample without a label is a
    problem."""
    n = len(buf)
    img = index.image[ids]
    present = img[:, 0] >= 0
    start = img[:, 0] - buf_start
    size = np.where(present, img[:, 1], 0)
    if present.any() and (start[present].min() < 0 or (start + size)[present].max() > n):
        raise TarFormatError("a sample lies outside the bytes read (truncated shard?)")
    start = np.where(present, start, 0)
    new = np.flatnonzero(~facts.seen[ids])
    if len(new):
        _work_out(buf, buf_start, index, ids[new], start[new], size[new], present[new], facts,
                  None if labels is None else np.asarray(labels)[new], labelled)  # fmt: skip
    more = _extra(buf, buf_start, index, ids, extra) if extra else None
    return Columns(shard=shard, keys=index.keys[ids], bufs=[buf], part=None, start=start,
                   size=size, label=facts.label[ids], key_hash=facts.key_hash[ids],
                   width=facts.width[ids], height=facts.height[ids],
                   problems=facts.problems(ids), extra=more)  # fmt: skip


def _work_out(buf, buf_start: int, index, ids, start, size, present, facts: ShardFacts, labels,
              labelled: bool) -> None:  # fmt: skip
    """Labels, key hashes and image checks of samples IDS, recorded in FACTS."""
    problems: dict[int, str] = {}
    if labels is not None:
        label = np.asarray(labels, dtype=np.int64)
    elif labelled:
        label = _parse_labels(buf, index.label[ids], buf_start, problems)
    else:
        label = np.full(len(ids), -1, dtype=np.int64)
    found, width, height = inspect_many(buf, start[present], size[present])
    rows = np.flatnonzero(present)
    for r, why in found.items():
        problems.setdefault(int(rows[r]), why)
    w = np.zeros(len(ids), dtype=np.int32)
    h = np.zeros(len(ids), dtype=np.int32)
    w[present], h[present] = width, height
    for r in np.flatnonzero(~present).tolist():
        problems[r] = NO_IMAGE  # said before any label problem: nothing to show without it
    facts.learn(ids, label, key_hashes(index.keys[ids].tolist()), w, h, problems)


def from_raw(raws: list, shard: int, labelled: bool, extra: tuple[str, ...]) -> Columns:
    """Columns of RAWS (RawSample: a shard read whole, no .idx), each worked out by
    to_sample; EXTRA: the member extensions the dataset asks for."""
    samples = [to_sample(r, labelled) for r in raws]
    images = [bytes(s.image) for s in samples]
    size = np.fromiter((len(b) for b in images), dtype=np.int64, count=len(images))
    problems = {i: s.problem for i, s in enumerate(samples) if s.problem is not None}
    keys = np.empty(len(samples), dtype=object)
    keys[:] = [s.key for s in samples]
    return Columns(shard=shard, keys=keys, bufs=[b"".join(images)], part=None,
                   start=np.cumsum(size) - size, size=size,
                   label=np.array([s.label for s in samples], dtype=np.int64),
                   key_hash=key_hashes(keys.tolist()),
                   width=np.array([s.width for s in samples], dtype=np.int32),
                   height=np.array([s.height for s in samples], dtype=np.int32),
                   problems=problems,
                   extra=[s.extra for s in samples] if extra else None)  # fmt: skip


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


def to_sample(raw: RawSample, labelled: bool = True) -> Sample:
    """Parse the label and check the image bytes; record what is wrong, if anything.
    An unlabelled dataset's samples get label -1 and need no .cls. (A read unit's samples
    get the same verdicts as arrays: pipeline.from_range.)"""
    problem = None
    label = -1
    if isinstance(raw.label, int):  # given by an adopted dataset's .labels
        label = raw.label
    elif not labelled:
        pass
    elif raw.label is None:
        problem = NO_LABEL
    else:
        try:
            label = int(raw.label)
        except ValueError:
            problem = BAD_LABEL
        if label not in INT64:
            label, problem = -1, BIG_LABEL
    if raw.image is None:
        return Sample(raw.key, b"", label, NO_IMAGE, raw.extra)
    bad, (width, height) = inspect_image(raw.image)
    return Sample(raw.key, raw.image, label, problem or bad, raw.extra, width, height)


def _parse_labels(buf, spans: np.ndarray, buf_start: int, problems: dict[int, str]) -> np.ndarray:
    """int() of each .cls member at SPANS ([n, 2] shard offset, size; -1: none), short
    runs of ASCII digits as arrays; PROBLEMS gets the rows without a usable label."""
    data = np.frombuffer(buf, dtype=np.uint8)
    out = np.full(len(spans), -1, dtype=np.int64)
    at, size = spans[:, 0] - buf_start, spans[:, 1]
    present = spans[:, 0] >= 0
    if present.any() and (at[present].min() < 0 or (at + size)[present].max() > len(data)):
        raise TarFormatError("a sample lies outside the bytes read (truncated shard?)")
    simple = present & (size >= 1) & (size <= _DIGITS)
    rows = np.flatnonzero(simple)
    if len(rows):
        # Right-aligned digits: column j of a label of k digits is its digit j - (18 - k).
        cols = np.arange(_DIGITS)
        first = _DIGITS - size[rows]
        inside = cols >= first[:, None]
        pos = np.where(inside, at[rows, None] + cols - first[:, None], 0)
        digits = data[pos].astype(np.int64) - ord("0")
        digits[~inside] = 0
        fine = ((digits >= 0) & (digits <= 9) | ~inside).all(axis=1)
        out[rows[fine]] = digits[fine] @ _POWERS
        simple[rows[~fine]] = False
    for r in np.flatnonzero(present & ~simple).tolist():
        a = int(at[r])
        try:
            value = int(bytes(buf[a : a + int(size[r])]))
        except ValueError:
            problems[r] = BAD_LABEL
            continue
        if value in INT64:
            out[r] = value
        else:
            problems[r] = BIG_LABEL
    for r in np.flatnonzero(~present).tolist():
        problems[r] = NO_LABEL
    return out


def _extra(buf, buf_start: int, index, ids: np.ndarray, extra: tuple[str, ...]) -> list:
    """The members of extensions EXTRA of each sample IDS (a dict per sample)."""
    n = len(buf)
    out: list[dict[str, bytes]] = [{} for _ in range(len(ids))]
    for ext in extra:
        span = index.spans.get(ext)
        if span is None:
            continue
        at, size = span[ids, 0], span[ids, 1]
        has = np.flatnonzero(at >= 0)
        lo = at[has] - buf_start
        if len(has) and (lo.min() < 0 or (lo + size[has]).max() > n):
            raise TarFormatError("a member lies outside the bytes read (truncated shard?)")
        for r, a, m in zip(has.tolist(), lo.tolist(), size[has].tolist(), strict=True):
            out[r][ext] = bytes(buf[a : a + m])
    return out
