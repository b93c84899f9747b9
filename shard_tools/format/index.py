"""The ``.idx`` beside a shard: DALI's webdataset index, format v1.2, written and read.

A line ``v1.2 <samples>``, then one line per sample listing
``<ext> <data offset> <size> <member name>`` for each of its members, as
DALI's ``wds2idx`` writes it. A writer that knows its offsets writes it in the
same pass; a reader locates any run of samples with it and slices their
members out of one ranged read, without parsing tar headers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shard_tools.format.names import IMAGE_EXTS, LABEL_EXT, split_name
from shard_tools.format.tar import RawSample, TarFormatError

IDX_VERSION = "v1.2"
# An adopted shard's samples in index order, with the label each was given when adopted
# (from its .cls, a .json field or a class list): "labels-v1 N", then "<label>\t<key>".
LABELS_VERSION = "labels-v1"
LABELS_SUFFIX = ".labels"


def index_line(members: Iterable[tuple]) -> str:
    """One sample's line from its members (ext, data offset, size, name, ...)."""
    return " ".join(f"{m[0]} {m[1]} {m[2]} {m[3]}" for m in members)


def index_text(sample_lines: list[str]) -> str:
    """The whole .idx file from one line per sample."""
    return f"{IDX_VERSION} {len(sample_lines)}\n" + "".join(line + "\n" for line in sample_lines)


def labels_text(rows: list[tuple[int, str]]) -> str:
    """A .labels file from (label, key) per sample."""
    return f"{LABELS_VERSION} {len(rows)}\n" + "".join(f"{label}\t{key}\n" for label, key in rows)


def parse_labels(text: str, *, source: str = "labels") -> tuple[np.ndarray, tuple[str, ...]]:
    """(int64 labels, keys) of a .labels file."""
    lines = text.split("\n")
    head = lines[0].split()
    if len(head) != 2 or head[0] != LABELS_VERSION or not head[1].isdigit():
        raise TarFormatError(f"{source}: unsupported header {lines[0][:40]!r}")
    rows = [ln.split("\t", 1) for ln in lines[1:] if ln]
    if len(rows) != int(head[1]) or any(len(r) != 2 for r in rows):
        raise TarFormatError(f"{source} declares {head[1]} samples but lists {len(rows)}")
    try:
        labels = np.array([int(r[0]) for r in rows], dtype=np.int64)
    except ValueError:
        raise TarFormatError(f"{source}: a label is not an integer") from None
    return labels, tuple(r[1] for r in rows)


@dataclass(frozen=True, kw_only=True, eq=False)
class ShardIndex:
    """The parsed .idx, as arrays: each sample's byte span in the tar, its key, and where
    each of its members lies, by extension. A loader keeps the index of every shard it
    reads; arrays hold ~150 bytes a sample where a tuple per member held ~860."""

    begin: np.ndarray  # int64 [n]: first data byte of the sample (after its header)
    end: np.ndarray  # int64 [n]: one past the last data byte
    keys: np.ndarray  # object [n]: str (a reader takes many with one index)
    # lower-case extension -> int64 [n, 2]: (offset, size) of that member, -1 if none
    spans: dict[str, np.ndarray]
    image: np.ndarray  # int64 [n, 2]: (offset, size) of the image member, -1 if none
    label: np.ndarray  # int64 [n, 2]: (offset, size) of the .cls member, -1 if none

    def __len__(self) -> int:
        return len(self.begin)

    def ranges(
        self, indices: np.ndarray, merge_gap: int, max_bytes: int
    ) -> list[tuple[int, int, np.ndarray]]:
        """Group sorted sample INDICES into byte ranges (start, stop, indices): runs whose
        gaps are at most MERGE_GAP bytes are read together, up to MAX_BYTES per range."""
        out: list[tuple[int, int, np.ndarray]] = []
        if len(indices) == 0:
            return out
        b, e = self.begin[indices], self.end[indices]  # e never decreases: indices are sorted
        gaps = (np.flatnonzero(b[1:] - e[:-1] > merge_gap) + 1).tolist()
        for lo, hi in zip([0, *gaps], [*gaps, len(indices)], strict=True):
            first = lo
            while first < hi:  # the longest run from FIRST within max_bytes, one sample at least
                stop = first + int(np.searchsorted(e[first:hi], b[first] + max_bytes, "right"))
                stop = max(stop, first + 1)
                out.append((int(b[first]), int(e[stop - 1]), indices[first:stop]))
                first = stop
        return out


def parse_index(text: str, *, source: str = "index") -> ShardIndex:
    """Parse a DALI webdataset index (v1.2: a header line ``v1.2 N``, then one line per sample)."""
    lines = text.splitlines()
    if not lines:
        raise TarFormatError(f"{source} is empty")
    head = lines[0].split()
    if len(head) != 2 or head[0] != IDX_VERSION:
        raise TarFormatError(
            f"{source}: unsupported index header {lines[0][:40]!r} (want '{IDX_VERSION} N')"
        )
    if not head[1].isdigit():
        raise TarFormatError(f"{source}: bad sample count in header {lines[0][:40]!r}")
    count = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != count:
        raise TarFormatError(f"{source} declares {count} samples but lists {len(body)}")
    keys = np.empty(count, dtype=object)
    begin = np.empty(count, dtype=np.int64)
    end = np.empty(count, dtype=np.int64)
    found: dict[str, list[tuple[int, int, int]]] = {}  # ext -> (sample, offset, size)
    for i, line in enumerate(body):
        parts = line.split(" ")
        if len(parts) % 4 or not all(p.isdigit() for p in parts[1::4] + parts[2::4]):
            raise TarFormatError(f"{source}: line {i + 2} is malformed")
        lo, hi = None, 0
        for j in range(0, len(parts), 4):
            offset, size = int(parts[j + 1]), int(parts[j + 2])
            found.setdefault(parts[j].lower(), []).append((i, offset, size))
            lo = offset if lo is None or offset < lo else lo
            hi = max(hi, offset + size)
        keys[i] = split_name(parts[3])[0]
        begin[i], end[i] = lo, hi
    spans = {}
    for ext, rows in found.items():
        span = np.full((count, 2), -1, dtype=np.int64)
        at = np.array(rows, dtype=np.int64)
        span[at[:, 0], 0], span[at[:, 0], 1] = at[:, 1], at[:, 2]  # a repeated extension: the last
        spans[ext] = span
    image = np.full((count, 2), -1, dtype=np.int64)
    for ext in reversed(IMAGE_EXTS):  # the first of IMAGE_EXTS a sample has
        if ext in spans:
            has = spans[ext][:, 0] >= 0
            image[has] = spans[ext][has]
    none = np.full((count, 2), -1, dtype=np.int64)
    return ShardIndex(begin=begin, end=end, keys=keys, spans=spans, image=image,
                      label=spans.get(LABEL_EXT, none))  # fmt: skip


def slice_samples(
    buf: bytes,
    buf_start: int,
    index: ShardIndex,
    indices: np.ndarray,
    extra: tuple[str, ...] = (),
    image_views: bool = False,
) -> list[RawSample]:
    """Cut samples INDICES out of BUF, which holds tar bytes from offset BUF_START, with
    the members of the (lower-case) extensions EXTRA. IMAGE_VIEWS: each image is a
    read-only memoryview of BUF instead of a copy (BUF lives as long as any of them)."""
    n = len(buf)
    images = memoryview(buf).toreadonly() if image_views else buf
    img = index.image[indices]
    lab = index.label[indices]
    # Every member must lie inside the bytes read; a short buffer means a truncated shard.
    for arr in (img, lab):
        present = arr[:, 0] >= 0
        if present.any():
            lo = arr[present, 0] - buf_start
            if lo.min() < 0 or (lo + arr[present, 1]).max() > n:
                raise TarFormatError("a sample lies outside the bytes read (truncated shard?)")
    keys = index.keys
    spans = [(ext, index.spans[ext]) for ext in extra if ext in index.spans]
    out = []
    for i, (io_, isz), (lo_, lsz) in zip(indices.tolist(), img.tolist(), lab.tolist(), strict=True):
        a = io_ - buf_start
        b = lo_ - buf_start
        more = None
        if extra:
            more = {}
            for ext, span in spans:
                off, size = span[i].tolist()
                if off >= 0:
                    lo = off - buf_start
                    if lo < 0 or lo + size > n:
                        raise TarFormatError(
                            "a member lies outside the bytes read (truncated shard?)"
                        )
                    more[ext] = buf[lo : lo + size]
        out.append(
            RawSample(
                keys[i],
                images[a : a + isz] if io_ >= 0 else None,
                buf[b : b + lsz] if lo_ >= 0 else None,
                more,
            )
        )
    return out
