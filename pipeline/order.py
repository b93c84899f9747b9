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

    shard: np.ndarray  # int32 (int64 past 2^31) [S]: shard number of input i
    index: np.ndarray  # int32 (int64 past 2^31) [S]: sample index inside that shard
    pad: np.ndarray  # bool [S]: input i is a pad repeat
    order: np.ndarray  # int32 (int64 past 2^31) [S]: output position -> input i

    def __len__(self) -> int:
        return len(self.order)

    def pending(self, consumed: int) -> np.ndarray:
        """Input positions not yet emitted after CONSUMED outputs, in input order."""
        left = np.ones(len(self.order), dtype=bool)
        left[self.order[:consumed]] = False
        return np.flatnonzero(left).astype(self.order.dtype)


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


def _ramp(n: int, buffer: int, initial: int | None) -> tuple[int, int]:
    """(size, c0): the buffer's slots over N inputs and how many it holds before the first
    output. A buffer that starts below its size grows by one slot per output (two inputs
    read per output) until it is full, webdataset's ``initial``: the first batch then
    waits for c0 + 2 * batch inputs, not for a whole buffer."""
    size = min(buffer, n)
    c0 = size if initial is None else max(1, min(initial, size))
    return size, c0


def _ramp_inputs(n: int, size: int, c0: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The growing stretch of a buffer that starts with C0 < SIZE inputs: inputs c0,
    c0+1, ... alternately take a new slot and replace one, until SIZE slots exist (2 *
    (size - c0) inputs at most, a few thousand). Returns the slot each of those inputs
    creates (-1: it replaces), the draws' upper bounds of the replacing ones, and how
    many inputs follow the ramp (each replaces one of SIZE slots)."""
    k = np.arange(min(n - c0, 2 * (size - c0)), dtype=np.int64)
    created = np.where(k % 2 == 0, c0 + k // 2, -1)
    highs = c0 + k[1::2] // 2 + 1  # slots that exist when a replacing input arrives
    return created, highs, n - c0 - len(k)


def _draws(rng: np.random.Generator, highs: np.ndarray, size: int, rest: int) -> np.ndarray:
    """The slots drawn by the replacing inputs, in input order: the ramp's, then REST
    draws over SIZE slots (a prefix of them is what fewer inputs would have drawn)."""
    ramp = rng.integers(0, highs).astype(np.int32) if len(highs) else np.zeros(0, np.int32)
    return np.concatenate([ramp, rng.integers(0, size, rest, dtype=np.int32)])


def _slots_of_inputs(n: int, size: int, c0: int, rng: np.random.Generator, draws: int | None = None
                     ) -> np.ndarray:  # fmt: skip
    """The slot every input of a growing buffer is written to; with DRAWS, only the inputs
    up to the DRAWS-th replacing one (what has been read when that many were emitted)."""
    created, highs, rest = _ramp_inputs(n, size, c0)
    if draws is not None:
        ramp_draws = min(draws, len(highs))
        highs, rest = highs[:ramp_draws], draws - ramp_draws
        # Inputs read: the first c0, the ramp up to its ramp_draws-th replacing input, rest.
        created = created[: 2 * ramp_draws] if rest == 0 else created
    body = created.astype(np.int32)
    drawn = _draws(rng, highs, size, rest)
    replacing = body < 0
    body[replacing] = drawn[: int(replacing.sum())]
    return np.concatenate([np.arange(c0, dtype=np.int32), body, drawn[int(replacing.sum()) :]])


def shuffle_buffer_order(
    n: int, buffer: int, rng: np.random.Generator, initial: int | None = None
) -> np.ndarray:
    """Output permutation of a streaming shuffle buffer with BUFFER slots over N inputs.

    The buffer takes inputs 0..size-1, then each input i >= size replaces the
    slot j_i drawn for it, whose occupant is emitted; the rest is drained in a
    random order. Computed without the loop: the occupant emitted at input i is
    the last input written to slot j_i before it (found by a stable sort of the
    slots, a radix sort for them), or the slot's first input if none was.
    With INITIAL < BUFFER the buffer starts with INITIAL inputs and grows (see
    :func:`_ramp`); the same sort finds what each replacing input emits.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size, c0 = _ramp(n, buffer, initial)
    if c0 < size:
        return _growing_buffer_order(n, size, c0, rng)
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


def _growing_buffer_order(n: int, size: int, c0: int, rng: np.random.Generator) -> np.ndarray:
    slot = _slots_of_inputs(n, size, c0, rng)
    created, _, _ = _ramp_inputs(n, size, c0)
    replaces = np.ones(n, dtype=bool)  # which inputs replace a slot (and emit its occupant)
    replaces[:c0] = False
    replaces[c0 : c0 + len(created)] = created < 0
    small = slot.astype(np.uint16) if size <= np.iinfo(np.uint16).max else slot
    order = np.argsort(small, kind="stable")  # every write, by slot, then by time
    prev = np.empty(n, dtype=np.int64)  # the write before each one in its slot
    prev[order[1:]] = order[:-1]
    emitted = prev[replaces]  # a replacing write emits the slot's occupant
    by_slot = slot[order]
    last = order[np.flatnonzero(np.append(by_slot[1:] != by_slot[:-1], True))]
    return np.concatenate([emitted, last[rng.permutation(len(last))]])


def _reference_shuffle_buffer_order(
    n: int, buffer: int, rng: np.random.Generator, initial: int | None = None
) -> np.ndarray:
    """The buffer simulated one input at a time (what shuffle_buffer_order computes)."""
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size, c0 = _ramp(n, buffer, initial)
    buf = list(range(c0))
    if c0 < size:  # growing: an input takes a new slot while the buffer is below its size
        highs, grow = [], []
        count = c0
        for _ in range(c0, n):
            grows = count < size and (len(grow) == 0 or not grow[-1])
            grow.append(grows)
            count += grows
            if not grows:
                highs.append(count)
        n_ramp = min(n - c0, 2 * (size - c0))
        ramp_highs = np.array(highs[: n_ramp // 2], dtype=np.int64)
        draws = iter(_draws(rng, ramp_highs, size, len(highs) - len(ramp_highs)).tolist())
    else:
        grow = [False] * (n - c0)
        draws = iter(rng.integers(0, size, n - size).tolist())
    out = []
    for i, g in zip(range(c0, n), grow, strict=True):
        if g:
            buf.append(i)
            continue
        j = next(draws)
        out.append(buf[j])
        buf[j] = i
    drain = np.asarray(buf, dtype=np.int64)[rng.permutation(len(buf))]
    return np.concatenate([np.asarray(out, dtype=np.int64), drain])


def rank_order(
    segments, *, seed: int, epoch: int, generation: int, rank: int, buffer: int,
    initial: int | None = None,
) -> RankOrder:  # fmt: skip
    """The rank's inputs and their shuffled output order."""
    shard, index, pad = expand(segments)
    rng = _buffer_rng(seed=seed, epoch=epoch, generation=generation, rank=rank)
    order = shuffle_buffer_order(len(shard), buffer, rng, initial)
    # A rank's plan is 13 bytes per sample held for the epoch: int32 halves it (shard
    # numbers, sample indexes and positions below 2^31 always hold for one rank).
    small = len(shard) < 2**31 and (not len(shard) or int(max(shard.max(), index.max())) < 2**31)
    if small:
        shard, index, order = (a.astype(np.int32) for a in (shard, index, order))
    return RankOrder(shard=shard, index=index, pad=pad, order=order)


def _buffer_rng(*, seed: int, epoch: int, generation: int, rank: int) -> np.random.Generator:
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, epoch, generation, rank, BUFFER_SALT]))
    )


def pending_positions(
    n: int, consumed: int, buffer: int, rng: np.random.Generator, initial: int | None = None
) -> np.ndarray:
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
    size, c0 = _ramp(n, buffer, initial)
    if c0 < size:
        return _growing_pending(n, consumed, size, c0, rng)
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


def _growing_pending(n: int, consumed: int, size: int, c0: int, rng) -> np.ndarray:
    """pending_positions for a buffer that starts with C0 < SIZE inputs."""
    _, highs, rest = _ramp_inputs(n, size, c0)
    if consumed > len(highs) + rest:  # draining: the whole order
        order = _growing_buffer_order(n, size, c0, rng)
        left = np.ones(n, dtype=bool)
        left[order[:consumed]] = False
        return np.flatnonzero(left)
    slot = _slots_of_inputs(n, size, c0, rng, draws=consumed)
    read = len(slot)  # inputs read by the time the CONSUMED-th output was emitted
    return np.concatenate([np.sort(_last_writers(slot)), np.arange(read, n, dtype=np.int64)])


def _last_writers(slot: np.ndarray) -> np.ndarray:
    """For every slot written in SLOT (the slot of each input, in input order), the last
    input written to it: searched from the end in growing windows, since every slot of a
    buffer is written again within a few times its size."""
    slots = int(slot.max()) + 1
    held = np.zeros(slots, dtype=np.int64)
    unseen = np.ones(slots, dtype=bool)
    hi, width = len(slot), 16 * slots
    while hi > 0 and unseen.any():
        lo = max(0, hi - width)
        values, first = np.unique(slot[lo:hi][::-1], return_index=True)
        new = unseen[values]
        held[values[new]] = hi - 1 - first[new]
        unseen[values[new]] = False
        hi, width = lo, width * 2
    return held


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
    split: Split, consumed: int, *, seed: int, epoch: int, generation: int, buffer: int,
    initial: int | None = None,
) -> Segments:  # fmt: skip
    """Unconsumed real samples of every rank after CONSUMED outputs each, rank by rank."""
    out = []
    for r, segs in enumerate(split.ranks):
        n = Segments.of(segs).total
        rng = _buffer_rng(seed=seed, epoch=epoch, generation=generation, rank=r)
        left = pending_positions(n, consumed, buffer, rng, initial)
        # Pad repeats are left out: the next split re-creates them if it needs them.
        out.append(_select(segs, left))
    return Segments.concat(out)


def _reference_remaining_stream(
    split: Split, consumed: int, *, seed: int, epoch: int, generation: int, buffer: int,
    initial: int | None = None,
) -> Segments:  # fmt: skip
    """_remaining_stream as earlier versions computed it, from every old rank's whole order
    (the tests check that both give the same samples; the scale benchmark times both)."""
    out = []
    for r, segs in enumerate(split.ranks):
        ro = rank_order(segs, seed=seed, epoch=epoch, generation=generation, rank=r,
                        buffer=buffer, initial=initial)  # fmt: skip
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
    initial: int | None = None,
) -> RankPlan:
    """Replay HISTORY (earlier generations of this epoch) and plan the current one.
    INITIAL: what the shuffle buffer holds before its first output (None: BUFFER)."""
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
        stream = _remaining_stream(split, gen.steps * gen.batch_size, seed=seed, epoch=epoch,
                                   generation=g, buffer=buffer, initial=initial)  # fmt: skip
        offset += gen.steps
        if not stream:
            break
    g = len(history)
    if not stream:  # the epoch was fully consumed before this generation
        none = Segments.of(())
        empty = Split(ranks=tuple(none if r == rank else None for r in range(world_size)), per_rank=0, steps=0, real=0, padded=0,
                      dropped=none)  # fmt: skip
        ro = rank_order((), seed=seed, epoch=epoch, generation=g, rank=rank, buffer=buffer,
                        initial=initial)  # fmt: skip
        return RankPlan(
            rank=rank, world_size=world_size, batch_size=batch_size, generation=g,
            step_offset=offset, steps=0, split=empty, ranks_order=ro, dropped_before=dropped,
        )  # fmt: skip
    split = split_stream(stream, world_size, batch_size, policy, rank=rank)
    ro = rank_order(split.ranks[rank], seed=seed, epoch=epoch, generation=g, rank=rank,
                    buffer=buffer, initial=initial)  # fmt: skip
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
