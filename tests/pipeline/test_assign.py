"""Shard assignment and the per-rank order: properties for world sizes 1..16."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.assign import epoch_stream, split_stream
from pipeline.order import Generation, expand, plan_rank
from pipeline.world import World

SHARD_LAYOUTS = {
    "7 even": [10] * 7,
    "7 uneven": [13, 7, 10, 1, 22, 9, 5],
    "2 shards": [30, 17],
    "1 shard": [41],
    "with empty": [8, 0, 12, 3],
}


class _Share:
    """One rank's part of the epoch, as the loader plans it (pipeline.order.plan_rank)."""

    def __init__(self, plan) -> None:
        self.segments = plan.split.ranks[plan.rank]
        self.steps = plan.steps
        self.per_rank = plan.split.per_rank
        self.padded = plan.split.padded
        self.dropped = plan.split.num_dropped

    def __eq__(self, other) -> bool:
        return vars(self) == vars(other)


def _all_ranks(sizes, world_size, *, epoch=0, seed=0, policy="pad", batch_size=1):
    return [
        _Share(plan_rank(sizes, epoch=epoch, seed=seed, policy=policy, shuffle=True, buffer=0,
                         history=[], world_size=world_size, batch_size=batch_size, rank=r))
        for r in range(world_size)
    ]  # fmt: skip


def _samples(shares):
    out = []
    for a in shares:
        shard, index, pad = expand(a.segments)
        out.append(list(zip(shard.tolist(), index.tolist(), pad.tolist(), strict=True)))
    return out


@pytest.mark.parametrize("layout", SHARD_LAYOUTS)
@pytest.mark.parametrize("world_size", range(1, 17))
@pytest.mark.parametrize("policy", ["pad", "drop"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_equal_steps_and_coverage(layout, world_size, policy, batch_size):
    sizes = SHARD_LAYOUTS[layout]
    total = sum(sizes)
    parts = _all_ranks(sizes, world_size, policy=policy, batch_size=batch_size)
    steps = {a.steps for a in parts}
    assert len(steps) == 1, "every rank must run the same number of steps"
    per_rank = parts[0].per_rank
    assert per_rank == parts[0].steps * batch_size
    samples = _samples(parts)
    assert all(len(s) == per_rank for s in samples)
    real = [(sh, i) for s in samples for sh, i, pad in s if not pad]
    pads = [(sh, i) for s in samples for sh, i, pad in s if pad]
    assert len(set(real)) == len(real), "a real sample was assigned twice"
    universe = {(sh, i) for sh, n in enumerate(sizes) for i in range(n)}
    assert set(real) <= universe
    unit = world_size * batch_size
    if policy == "pad":
        assert set(real) == universe, "pad must not lose samples"
        assert len(pads) == parts[0].padded == per_rank * world_size - total < unit
        assert set(pads) <= universe
    else:
        assert not pads
        assert total - len(real) == parts[0].dropped < unit


@pytest.mark.parametrize("world_size", [4, 8, 16])
def test_fewer_shards_than_ranks_read_subranges(world_size):
    parts = _all_ranks([50, 30], world_size)
    assert all(a.segments for a in parts)
    for a in parts:  # contiguous: at most a couple of segments per rank
        assert len(a.segments) <= 3


def test_seven_shards_four_ranks_read_few_shards():
    parts = _all_ranks([100] * 7, 4, batch_size=8)
    assert {a.steps for a in parts} == {22}
    for a in parts:
        assert len({s.shard for s in a.segments}) <= 3


def test_deterministic_and_epochs_differ():
    sizes = [10] * 12
    a = _all_ranks(sizes, 3, epoch=1, seed=5)
    b = _all_ranks(sizes, 3, epoch=1, seed=5)
    assert a == b
    c = _all_ranks(sizes, 3, epoch=2, seed=5)
    assert [x.segments for x in a] != [x.segments for x in c]
    d = _all_ranks(sizes, 3, epoch=1, seed=6)
    assert [x.segments for x in a] != [x.segments for x in d]


def test_pad_cycles_when_stream_is_shorter_than_the_gap():
    parts = _all_ranks([2], 5, batch_size=2)
    assert parts[0].per_rank == 2 and parts[0].padded == 8
    assert all(len(s) == 2 for s in _samples(parts))


def test_drop_can_leave_zero_steps():
    parts = _all_ranks([3], 4, policy="drop", batch_size=1)
    assert all(a.steps == 0 for a in parts) and parts[0].dropped == 3


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        split_stream(epoch_stream([0, 0], 0, 0), 2, 1, "pad")


def _plan_all(sizes, world_size, batch_size, history=(), *, buffer=16, policy="pad", epoch=0):
    return [
        plan_rank(
            sizes, epoch=epoch, seed=3, policy=policy, shuffle=True, buffer=buffer,
            history=list(history), world_size=world_size, batch_size=batch_size, rank=r,
        )
        for r in range(world_size)
    ]  # fmt: skip


def _outputs(plan, start_step=0, stop_step=None):
    ro = plan.ranks_order
    b = plan.batch_size
    stop = plan.steps if stop_step is None else stop_step
    sel = ro.order[start_step * b : stop * b]
    return list(
        zip(ro.shard[sel].tolist(), ro.index[sel].tolist(), ro.pad[sel].tolist(), strict=True)
    )


def test_shuffle_buffer_is_a_permutation_and_seeded():
    plans = _plan_all([40, 25, 33], 2, 4)
    for p in plans:
        out = _outputs(p)
        ro = p.ranks_order
        assert sorted(ro.order.tolist()) == list(range(len(ro)))
        assert out != list(zip(ro.shard.tolist(), ro.index.tolist(), ro.pad.tolist(), strict=True))
    again = _plan_all([40, 25, 33], 2, 4)
    assert [_outputs(p) for p in plans] == [_outputs(p) for p in again]


@pytest.mark.parametrize("policy", ["pad", "drop"])
@pytest.mark.parametrize(("old", "new"), [(4, 3), (3, 4), (2, 5), (5, 1)])
def test_elastic_resplit_loses_nothing(policy, old, new):
    sizes = [37, 12, 50, 21, 8]
    batch = 3
    first = _plan_all(sizes, old, batch, policy=policy)
    k = first[0].steps // 2
    seen = Counter()
    for p in first:
        seen.update((s, i) for s, i, pad in _outputs(p, 0, k) if not pad)
    second = _plan_all(sizes, new, batch, [Generation(old, batch, k)], policy=policy)
    assert len({p.steps for p in second}) == 1
    assert all(p.step_offset == k for p in second)
    for p in second:
        seen.update((s, i) for s, i, pad in _outputs(p) if not pad)
    universe = {(sh, i) for sh, n in enumerate(sizes) for i in range(n)}
    assert max(seen.values()) == 1, "a sample was seen twice as a real sample"
    if policy == "pad":
        assert set(seen) == universe
    else:
        lost = len(universe) - len(seen)
        assert lost == first[0].split.num_dropped + second[0].split.num_dropped


def test_elastic_twice_in_one_epoch():
    sizes = [30] * 6
    g1 = _plan_all(sizes, 4, 2)
    seen = Counter()
    for p in g1:
        seen.update((s, i) for s, i, pad in _outputs(p, 0, 5) if not pad)
    h = [Generation(4, 2, 5)]
    g2 = _plan_all(sizes, 3, 4, h)
    for p in g2:
        seen.update((s, i) for s, i, pad in _outputs(p, 0, 3) if not pad)
    g3 = _plan_all(sizes, 2, 4, [*h, Generation(3, 4, 3)])
    for p in g3:
        seen.update((s, i) for s, i, pad in _outputs(p) if not pad)
    assert max(seen.values()) == 1
    assert len(seen) == 180


def test_world_from_env():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
    }
    w = World.from_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.node_rank) == (5, 8, 1, 4, 1)
    assert World.from_env({}) == World()
    with pytest.raises(ValueError):
        World(rank=2, world_size=2)
    with pytest.raises(ValueError, match="not an integer"):
        World.from_env({"RANK": "x"})


def test_expand_matches_segments():
    parts = _all_ranks([5, 7], 2)
    shard, index, _ = expand(parts[0].segments)
    assert len(shard) == parts[0].per_rank
    assert np.all(index >= 0)


@pytest.mark.parametrize("initial", [None, 1, 3, 64])
@pytest.mark.parametrize(("n", "buffer"), [(0, 5), (1, 5), (5, 5), (6, 5), (37, 7), (1000, 1),
                                           (1000, 4096), (5000, 4096), (60000, 4096), (3000, 70000)])  # fmt: skip
def test_the_vectorised_shuffle_buffer_is_the_one_input_at_a_time_buffer(n, buffer, initial):
    from pipeline.order import (
        _reference_shuffle_buffer_order,
        pending_positions,
        shuffle_buffer_order,
    )

    for seed in (0, 1):
        rng = np.random.default_rng
        order = shuffle_buffer_order(n, buffer, rng(seed), initial)
        assert np.array_equal(order, _reference_shuffle_buffer_order(n, buffer, rng(seed), initial))
        assert sorted(order.tolist()) == list(range(n))
        size = min(buffer, n)
        ramp = 2 * max(0, size - (initial or size))  # a growing buffer reads 2 inputs per output
        for consumed in sorted({0, 1, n // 3, max(0, n - size), max(0, n - size) + 1, n,
                                min(n, ramp // 2), min(n, ramp // 2 + 1)}):  # fmt: skip
            want = np.sort(order[consumed:])
            got = pending_positions(n, consumed, buffer, rng(seed), initial)
            assert np.array_equal(got, want)


def test_a_growing_buffer_emits_its_first_outputs_from_the_first_inputs():
    from pipeline.order import shuffle_buffer_order

    n, buffer, initial = 3000, 256, 16
    order = shuffle_buffer_order(n, buffer, np.random.default_rng(4), initial)
    # Output k can only be an input already read: at most initial + 2k + 1 during the ramp.
    k = np.arange(buffer - initial)
    assert np.all(order[k] <= initial + 2 * k + 1)
    # Started full, output k waits for input buffer + k: early outputs come from further in.
    full = shuffle_buffer_order(n, buffer, np.random.default_rng(4))
    assert np.any(full[k] > initial + 2 * k + 1)


@pytest.mark.parametrize("policy", ["pad", "drop"])
def test_the_remaining_stream_is_what_the_whole_orders_leave(policy):
    from pipeline.assign import split_stream
    from pipeline.order import _reference_remaining_stream, _remaining_stream

    sizes = [370, 120, 501, 213, 88]
    for world, batch, buffer, initial in ((4, 3, 64, None), (3, 5, 1, None), (2, 7, 4096, None),
                                          (4, 3, 64, 6), (2, 7, 4096, 14)):  # fmt: skip
        split = split_stream(epoch_stream(sizes, 2, 9), world, batch, policy)
        for k in (0, 1, split.steps // 2, split.steps):
            kw = dict(seed=9, epoch=2, generation=0, buffer=buffer, initial=initial)
            a = expand(_remaining_stream(split, k * batch, **kw))
            b = expand(_reference_remaining_stream(split, k * batch, **kw))
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
