"""The exact sample order of a rank, computed from sample counts alone.

A rank reads its segments sequentially (its *input* order) and emits samples
through a shuffle buffer of ``buffer`` slots (webdataset-style: once the buffer
is full, each new sample replaces a uniformly drawn slot, whose sample is
emitted; the rest is drained in random order). Because the buffer is simulated
over (shard, index) pairs with an RNG seeded from (seed, epoch, generation,
rank), the whole epoch's *output* order is known before any byte is read. That
is what makes exact resume, elastic re-splitting and per-rank key reports
possible: the reader only has to fetch inputs in input order and hand them out
in output order, holding at most ``buffer`` of them.

Resume and elasticity are expressed as *generations*: an epoch starts with
generation 0 = :func:`pipeline.assign.split_stream` of the epoch stream. When a
run stops after K steps and resumes with another world size (or batch size),
every old rank's unconsumed samples (its buffer leftovers, then its untouched
suffix, pad repeats removed) are concatenated rank by rank into a new stream
that is split again over the new world. Replaying the generations recorded in
the loader state gives the same plan on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.assign import Segments, Split, epoch_stream, split_stream

BUFFER_SALT = 0xB0FF


@dataclass(frozen=True)
class Generation:
    """A stretch of an epoch run with one world size and per-rank batch size."""

    world_size: int
    batch_size: int
    steps: int  # steps every rank consumed in this generation


@dataclass(frozen=True, kw_only=True)
class RankOrder:
    """One rank's inputs (read order) and the output permutation over them."""

    shard: np.ndarray  # int64 [S]: shard number of input i
    index: np.ndarray  # int64 [S]: sample index inside that shard
    pad: np.ndarray  # bool [S]: input i is a pad repeat
    order: np.ndarray  # int64 [S]: output position -> input i

    def __len__(self) -> int:
        return len(self.order)

    def pending(self, consumed: int) -> np.ndarray:
        """Input positions not yet emitted after CONSUMED outputs, in input order."""
        left = np.ones(len(self.order), dtype=bool)
        left[self.order[:consumed]] = False
        return np.flatnonzero(left)


@dataclass(frozen=True, kw_only=True)
class RankPlan:
    """Everything a rank needs to produce its batches for the current generation."""

    rank: int
    world_size: int
    batch_size: int
    generation: int
    step_offset: int  # steps of the epoch consumed in earlier generations
    steps: int  # steps of this generation
    dropped_before: int = 0  # samples dropped by the splits of earlier generations
    split: Split
    ranks_order: RankOrder

    @property
    def epoch_steps(self) -> int:
        return self.step_offset + self.steps


def expand(segments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments -> per-sample (shard, index, pad) arrays, in stream order."""
    segs = Segments.of(segments)
    lengths = segs.lengths
    n = int(lengths.sum())
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=bool)
    shard = np.repeat(segs.shard, lengths)
    seg_begin = np.repeat(np.cumsum(lengths) - lengths - segs.start, lengths)
    index = np.arange(n, dtype=np.int64) - seg_begin
    pad = np.repeat(segs.pad, lengths)
    return shard, index, pad


def coalesce(shard: np.ndarray, index: np.ndarray) -> Segments:
    """Per-sample (shard, index) arrays -> the fewest segments in the same order."""
    if len(shard) == 0:
        return Segments.of(())
    brk = np.flatnonzero((np.diff(shard) != 0) | (np.diff(index) != 1)) + 1
    starts = np.concatenate([[0], brk])
    stops = np.concatenate([brk, [len(shard)]])
    return Segments(shard[starts], index[starts], index[stops - 1] + 1)


def shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output permutation of a streaming shuffle buffer with BUFFER slots over N inputs.

    The buffer takes inputs 0..size-1, then each input i >= size replaces the
    slot j_i drawn for it, whose occupant is emitted; the rest is drained in a
    random order. Computed without the loop: the occupant emitted at input i is
    the last input written to slot j_i before it (found by a stable sort of the
    slots, a radix sort for them), or the slot's first input if none was.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size = min(buffer, n)
    m = n - size
    slots = rng.integers(0, size, m, dtype=np.int32)  # the same draws as int64, half the memory
    out = np.empty(n, dtype=np.int64)
    final = np.arange(size, dtype=np.int64)  # each slot's occupant once every input is in
    if m:
        small = slots.astype(np.uint16) if size <= np.iinfo(np.uint16).max else slots
        order = np.argsort(small, kind="stable")  # by slot, then by time
        by_slot = slots[order]
        repeat = np.empty(m, dtype=bool)
        repeat[0] = False
        np.equal(by_slot[1:], by_slot[:-1], out=repeat[1:])
        emitted = slots.astype(np.int64)  # a slot's first write emits its first input...
        later = order[repeat]
        emitted[later] = (
            size + order[np.flatnonzero(repeat) - 1]
        )  # ...later ones the previous writer
        out[:m] = emitted
        last = np.flatnonzero(np.append(by_slot[1:] != by_slot[:-1], True))
        final[by_slot[last]] = size + order[last]
    out[m:] = final[rng.permutation(size)]
    return out


def _reference_shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The buffer simulated one input at a time (what shuffle_buffer_order computes)."""
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size = min(buffer, n)
    buf = list(range(size))
    out = np.empty(n, dtype=np.int64)
    slots = rng.integers(0, size, n - size).tolist()
    k = 0
    for i, j in zip(range(size, n), slots, strict=True):
        out[k] = buf[j]
        buf[j] = i
        k += 1
    out[k:] = np.asarray(buf, dtype=np.int64)[rng.permutation(size)]
    return out


def rank_order(
    segments, *, seed: int, epoch: int, generation: int, rank: int, buffer: int
) -> RankOrder:
    """The rank's inputs and their shuffled output order."""
    shard, index, pad = expand(segments)
    rng = _buffer_rng(seed=seed, epoch=epoch, generation=generation, rank=rank)
    return RankOrder(
        shard=shard, index=index, pad=pad, order=shuffle_buffer_order(len(shard), buffer, rng)
    )


def _buffer_rng(*, seed: int, epoch: int, generation: int, rank: int) -> np.random.Generator:
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, epoch, generation, rank, BUFFER_SALT]))
    )


def pending_positions(n: int, consumed: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Input positions (sorted) not yet emitted after CONSUMED outputs of the shuffle buffer
    of :func:`shuffle_buffer_order` over N inputs, whose RNG RNG is.

    Needs neither the whole order nor a loop: after k < N - size outputs, what is
    left is the buffer (each slot holds the last input written to it among the
    first k writes, or its first input) and the inputs not read yet. The last
    writes of each slot are found near the end of the k draws (4,096 slots are
    all written again within some 40,000 draws), so only a window is searched.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(min(consumed, n), n, dtype=np.int64)
    size = min(buffer, n)
    m = n - size
    if consumed > m:  # draining the buffer: rare (the end of an epoch), the whole order it is
        order = shuffle_buffer_order(n, buffer, rng)
        left = np.ones(n, dtype=bool)
        left[order[:consumed]] = False
        return np.flatnonzero(left)
    slots = rng.integers(0, size, consumed, dtype=np.int32)  # the draws shuffle_buffer_order makes
    held = np.arange(size, dtype=np.int64)
    unseen = np.ones(size, dtype=bool)
    hi, width = consumed, 16 * size
    while hi > 0 and unseen.any():
        lo = max(0, hi - width)
        values, first = np.unique(slots[lo:hi][::-1], return_index=True)
        new = unseen[values]
        held[values[new]] = size + (hi - 1 - first[new])
        unseen[values[new]] = False
        hi, width = lo, width * 2
    return np.concatenate([np.sort(held), np.arange(size + consumed, n, dtype=np.int64)])


def _select(segments, positions: np.ndarray) -> Segments:
    """The real (not pad) samples at input POSITIONS (sorted) of SEGMENTS, as segments."""
    segs = Segments.of(segments)
    if not len(positions) or not len(segs):
        return Segments.of(())
    lengths = segs.lengths
    ends = np.cumsum(lengths)
    seg = np.searchsorted(ends, positions, side="right")
    index = segs.start[seg] + positions - (ends - lengths)[seg]
    real = ~segs.pad[seg]
    return coalesce(segs.shard[seg][real], index[real])


def _remaining_stream(
    split: Split, consumed: int, *, seed: int, epoch: int, generation: int, buffer: int
) -> Segments:
    """Unconsumed real samples of every rank after CONSUMED outputs each, rank by rank."""
    out = []
    for r, segs in enumerate(split.ranks):
        n = Segments.of(segs).total
        rng = _buffer_rng(seed=seed, epoch=epoch, generation=generation, rank=r)
        left = pending_positions(n, consumed, buffer, rng)
        # Pad repeats are left out: the next split re-creates them if it needs them.
        out.append(_select(segs, left))
    return Segments.concat(out)


def _reference_remaining_stream(
    split: Split, consumed: int, *, seed: int, epoch: int, generation: int, buffer: int
) -> Segments:
    """_remaining_stream as earlier versions computed it, from every old rank's whole order
    (the tests check that both give the same samples; the scale benchmark times both)."""
    out = []
    for r, segs in enumerate(split.ranks):
        ro = rank_order(segs, seed=seed, epoch=epoch, generation=generation, rank=r, buffer=buffer)
        left = np.sort(ro.order[consumed:])
        left = left[~ro.pad[left]]
        out.append(coalesce(ro.shard[left], ro.index[left]))
    return Segments.concat(out)


def plan_rank(
    sizes: Sequence[int],
    *,
    epoch: int,
    seed: int,
    policy: str,
    shuffle: bool,
    buffer: int,
    history: Sequence[Generation],
    world_size: int,
    batch_size: int,
    rank: int,
) -> RankPlan:
    """Replay HISTORY (earlier generations of this epoch) and plan the current one."""
    buffer = buffer if shuffle else 0
    stream = epoch_stream(sizes, epoch, seed, shuffle)
    offset = 0
    dropped = 0
    for g, gen in enumerate(history):
        split = split_stream(stream, gen.world_size, gen.batch_size, policy)
        dropped += split.num_dropped
        if not 0 <= gen.steps <= split.steps:
            raise ValueError(
                f"resume state says {gen.steps} steps were taken in a generation of "
                f"{split.steps} steps: the state does not belong to this dataset/config"
            )
        stream = _remaining_stream(
            split, gen.steps * gen.batch_size, seed=seed, epoch=epoch, generation=g, buffer=buffer
        )
        offset += gen.steps
        if not stream:
            break
    g = len(history)
    if not stream:  # the epoch was fully consumed before this generation
        none = Segments.of(())
        empty = Split(ranks=(none,) * world_size, per_rank=0, steps=0, real=0, padded=0,
                      dropped=none)  # fmt: skip
        ro = rank_order((), seed=seed, epoch=epoch, generation=g, rank=rank, buffer=buffer)
        return RankPlan(
            rank=rank, world_size=world_size, batch_size=batch_size, generation=g,
            step_offset=offset, steps=0, split=empty, ranks_order=ro, dropped_before=dropped,
        )  # fmt: skip
    split = split_stream(stream, world_size, batch_size, policy)
    ro = rank_order(
        split.ranks[rank], seed=seed, epoch=epoch, generation=g, rank=rank, buffer=buffer
    )
    return RankPlan(
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        generation=g,
        step_offset=offset,
        steps=split.steps,
        split=split,
        ranks_order=ro,
        dropped_before=dropped,
    )
