"""Who reads what: the epoch's sample stream, cut into equal per-rank parts.

:func:`pipeline.order.plan_rank` (the one function the loader plans with, and
the one the property tests check for world sizes 1..16) builds on these pieces.

The epoch's global sample stream is the shards in an order shuffled from
(seed, epoch), each shard's samples in pack order. The stream is cut into
``world_size`` CONTIGUOUS equal parts, so a rank reads few shards (sequential
reads, good for object storage) and fewer shards than ranks still works: ranks
then read sub-ranges of a shard, seeking with its ``.idx``.

Remainder policy, with R samples in the stream, W ranks and per-rank batch B:

* ``pad``: every rank gets P = B * ceil(R / (W*B)) samples; the W*P - R missing
  ones repeat the start of the stream (cycling if the stream is shorter than
  the gap). No sample is lost; fewer than W*B are seen twice.
* ``drop``: every rank gets P = B * floor(R / (W*B)); the last R - W*P samples
  of the stream are not seen this epoch (a different tail every epoch, since
  the shard order changes).

Either way every batch is full and every rank runs P / B steps, so no
collective can hang on an uneven split. Work is a list of segments
(shard, start, stop): O(shards + ranks), never O(samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Salts keep the RNG streams of different purposes independent for equal seeds.
SHARD_ORDER_SALT = 0x5A4D


@dataclass(frozen=True)
class Segment:
    """Samples ``start..stop-1`` of shard number ``shard`` (an index into the
    manifest's shard list); ``pad`` marks repeats added by the pad policy."""

    shard: int
    start: int
    stop: int
    pad: bool = False

    def __len__(self) -> int:
        return self.stop - self.start


class Segments:
    """A run of segments held as columns, so that a stream of 10^5 shards costs a few
    arrays rather than 10^5 objects. Iterating it (or indexing it) gives
    :class:`Segment` objects; ``len()`` is the number of segments, ``total`` the samples."""

    __slots__ = ("shard", "start", "stop", "pad")

    def __init__(self, shard, start, stop, pad=None) -> None:
        self.shard = np.asarray(shard, dtype=np.int64)
        self.start = np.asarray(start, dtype=np.int64)
        self.stop = np.asarray(stop, dtype=np.int64)
        self.pad = np.zeros(len(self.shard), dtype=bool) if pad is None else np.asarray(pad, bool)

    @classmethod
    def of(cls, segments) -> Segments:
        """SEGMENTS (a Segments, or any sequence of Segment) as columns."""
        if isinstance(segments, Segments):
            return segments
        segs = list(segments)
        return cls(
            [s.shard for s in segs], [s.start for s in segs], [s.stop for s in segs],
            [s.pad for s in segs],
        )  # fmt: skip

    @classmethod
    def concat(cls, parts) -> Segments:
        parts = [cls.of(p) for p in parts]
        if not parts:
            return cls.of(())
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in cls.__slots__))

    @property
    def lengths(self) -> np.ndarray:
        return self.stop - self.start

    @property
    def total(self) -> int:
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Segments(self.shard[i], self.start[i], self.stop[i], self.pad[i])
        return Segment(int(self.shard[i]), int(self.start[i]), int(self.stop[i]), bool(self.pad[i]))

    def __iter__(self):
        cols = (self.shard.tolist(), self.start.tolist(), self.stop.tolist(), self.pad.tolist())
        return (Segment(*row) for row in zip(*cols, strict=True))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Segments):
            try:
                other = Segments.of(other)
            except (TypeError, AttributeError):
                return NotImplemented
        return all(np.array_equal(getattr(self, c), getattr(other, c)) for c in self.__slots__)

    def __repr__(self) -> str:
        return f"Segments({list(self)!r})"

    def with_pad(self) -> Segments:
        return Segments(self.shard, self.start, self.stop, np.ones(len(self), dtype=bool))


@dataclass(frozen=True, kw_only=True)
class Split:
    """A stream cut into equal per-rank parts."""

    ranks: tuple[Segments | None, ...]  # None for the ranks a one-rank split left out
    per_rank: int  # samples per rank, pad included
    steps: int  # batches per rank
    real: int  # samples in the stream before pad/drop
    padded: int  # repeats added (all ranks)
    dropped: Segments  # tail not assigned to any rank

    @property
    def num_dropped(self) -> int:
        return Segments.of(self.dropped).total


def shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's shard order: a permutation seeded from (seed, epoch) only."""
    if not shuffle:
        return np.arange(num_shards)
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, epoch, SHARD_ORDER_SALT]))
    )
    return rng.permutation(num_shards)


def epoch_stream(sizes: Sequence[int], epoch: int, seed: int, shuffle: bool = True) -> Segments:
    """The epoch's global stream: whole shards in the shuffled order (empty ones skipped)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    order = shard_order(len(sizes), epoch, seed, shuffle)
    order = order[sizes[order] > 0]
    return Segments(order, np.zeros(len(order), dtype=np.int64), sizes[order])


def _take(stream: Segments, count: int, *, pad: bool = False) -> Segments:
    """The first COUNT samples of STREAM (cycling), optionally marked as pad."""
    total = stream.total
    if count <= 0 or total == 0:
        return Segments.of(())
    whole, rest = divmod(count, total)
    head, _ = _cut(stream, [rest])
    out = Segments.concat([stream] * whole + [head[0]])
    return out.with_pad() if pad else out


def _cut(stream: Segments, sizes: Sequence[int]) -> tuple[list[Segments], Segments]:
    """Cut STREAM into consecutive parts of the given sizes; return them and the rest.

    Vectorised: the cut points are found in the running sum of segment lengths; a
    segment a cut falls inside is split in two, the others are taken as they are."""
    stream = Segments.of(stream)
    ends = np.cumsum(stream.lengths)
    total = int(ends[-1]) if len(ends) else 0
    cuts = np.minimum(np.cumsum(np.asarray(sizes, dtype=np.int64)), total)
    lo_pos = np.concatenate([[0], cuts]).astype(np.int64)
    parts = [
        _range(stream, ends, int(a), int(b)) for a, b in zip(lo_pos[:-1], lo_pos[1:], strict=True)
    ]
    return parts, _range(stream, ends, int(lo_pos[-1]), total)


def _range(stream: Segments, ends: np.ndarray, a: int, b: int) -> Segments:
    """Samples A..B-1 of STREAM (positions in the stream) as segments."""
    if b <= a:
        return Segments.of(())
    first = int(np.searchsorted(ends, a, side="right"))  # the segment holding position a
    last = int(np.searchsorted(ends, b - 1, side="right"))  # ... and position b-1
    part = stream[first : last + 1]
    begins = ends[first : last + 1] - part.lengths  # stream position of each segment's start
    start = part.start.copy()
    stop = part.stop.copy()
    start[0] += a - int(begins[0])
    stop[-1] -= int(ends[last]) - b
    # Copies, not views: a rank's part must not keep the whole stream's arrays alive.
    return Segments(part.shard.copy(), start, stop, part.pad.copy())


def split_stream(
    stream, world_size: int, batch_size: int, policy: str, rank: int | None = None
) -> Split:
    """Cut a stream into ``world_size`` contiguous parts of equal, whole-batch size.
    With RANK, only that rank's part is kept (the others are None): a rank's plan need
    not hold the segments of every other rank."""
    if world_size < 1 or batch_size < 1:
        raise ValueError("world_size and batch_size must be >= 1")
    if policy not in ("pad", "drop"):
        raise ValueError(f"remainder policy must be 'pad' or 'drop', got {policy!r}")
    stream = Segments.of(stream)
    real = stream.total
    if real == 0:
        raise ValueError("the dataset has no samples to read")
    unit = world_size * batch_size
    steps = -(-real // unit) if policy == "pad" else real // unit
    per_rank = steps * batch_size
    total = per_rank * world_size
    padded = max(0, total - real)
    extended = Segments.concat([stream, _take(stream, padded, pad=True)])
    parts, rest = _cut(extended, [per_rank] * world_size)
    if rank is not None:
        parts = [p if r == rank else None for r, p in enumerate(parts)]
    return Split(
        ranks=tuple(parts),
        per_rank=per_rank,
        steps=steps,
        real=real,
        padded=padded,
        dropped=rest,
    )
