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


@dataclass(frozen=True, kw_only=True)
class Split:
    """A stream cut into equal per-rank parts."""

    ranks: tuple[tuple[Segment, ...], ...]
    per_rank: int  # samples per rank, pad included
    steps: int  # batches per rank
    real: int  # samples in the stream before pad/drop
    padded: int  # repeats added (all ranks)
    dropped: tuple[Segment, ...]  # tail not assigned to any rank

    @property
    def num_dropped(self) -> int:
        return sum(len(s) for s in self.dropped)


def shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's shard order: a permutation seeded from (seed, epoch) only."""
    if not shuffle:
        return np.arange(num_shards)
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, epoch, SHARD_ORDER_SALT]))
    )
    return rng.permutation(num_shards)


def epoch_stream(
    sizes: Sequence[int], epoch: int, seed: int, shuffle: bool = True
) -> list[Segment]:
    """The epoch's global stream: whole shards in the shuffled order (empty ones skipped)."""
    order = shard_order(len(sizes), epoch, seed, shuffle)
    return [Segment(int(s), 0, int(sizes[s])) for s in order if sizes[s] > 0]


def _take(stream: Sequence[Segment], count: int, *, pad: bool = False) -> list[Segment]:
    """The first COUNT samples of STREAM (cycling), optionally marked as pad."""
    out: list[Segment] = []
    while count > 0:
        for seg in stream:
            n = min(len(seg), count)
            if n > 0:
                out.append(Segment(seg.shard, seg.start, seg.start + n, pad or seg.pad))
                count -= n
            if count == 0:
                break
    return out


def _cut(
    stream: Sequence[Segment], sizes: Sequence[int]
) -> tuple[list[list[Segment]], list[Segment]]:
    """Cut STREAM into consecutive parts of the given sizes; return them and the rest."""
    parts: list[list[Segment]] = []
    it = iter(stream)
    cur: Segment | None = next(it, None)
    for want in sizes:
        part: list[Segment] = []
        while want > 0 and cur is not None:
            n = min(len(cur), want)
            part.append(Segment(cur.shard, cur.start, cur.start + n, cur.pad))
            want -= n
            cur = (
                Segment(cur.shard, cur.start + n, cur.stop, cur.pad)
                if n < len(cur)
                else next(it, None)
            )
        parts.append(part)
    rest = ([cur] if cur is not None and len(cur) > 0 else []) + list(it)
    return parts, rest


def split_stream(stream: Sequence[Segment], world_size: int, batch_size: int, policy: str) -> Split:
    """Cut a stream into ``world_size`` contiguous parts of equal, whole-batch size."""
    if world_size < 1 or batch_size < 1:
        raise ValueError("world_size and batch_size must be >= 1")
    if policy not in ("pad", "drop"):
        raise ValueError(f"remainder policy must be 'pad' or 'drop', got {policy!r}")
    real = sum(len(s) for s in stream)
    if real == 0:
        raise ValueError("the dataset has no samples to read")
    unit = world_size * batch_size
    steps = -(-real // unit) if policy == "pad" else real // unit
    per_rank = steps * batch_size
    total = per_rank * world_size
    padded = max(0, total - real)
    extended = list(stream) + _take(stream, padded, pad=True)
    parts, rest = _cut(extended, [per_rank] * world_size)
    return Split(
        ranks=tuple(tuple(p) for p in parts),
        per_rank=per_rank,
        steps=steps,
        real=real,
        padded=padded,
        dropped=tuple(rest),
    )
