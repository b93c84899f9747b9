"""Read units as columns (pipeline.columns): labels parsed as int() parses them, each
sample worked out once per shard, batches gathered from several units with stand-ins."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import LoaderConfig, World, build_loader, columns
from pipeline.loader import Job
from pipeline.reader import encoded_batches


def test_labels_are_what_int_makes_of_them():
    texts = [b"3", b"0", b"0042", b"999999999999999999", b"1234567890123456789012", b" 7\n",
             b"+5", b"-1", b"1_000", b"", b"abc", b"4x", b"\n", b"12 3"]  # fmt: skip
    buf = bytearray(b"#" * 11)
    spans = []
    for t in texts:
        spans.append((len(buf) + 100, len(t)))  # the buffer starts at shard offset 100
        buf += t + b"#" * 5
    spans.append((-1, -1))  # no .cls member
    problems: dict[int, str] = {}
    got = columns._parse_labels(bytes(buf), np.array(spans, dtype=np.int64), 100, problems)
    for i, t in enumerate(texts):
        try:
            want = int(t)
        except ValueError:
            assert problems[i] == columns.BAD_LABEL, t
            continue
        if want < 2**63:
            assert got[i] == want and i not in problems, t
        else:
            assert problems[i] == columns.BIG_LABEL, t
    assert problems[len(texts)] == columns.NO_LABEL


def _job(loader, epoch=0):
    return Job(cfg=loader.cfg, world=loader.world, epoch=epoch, plan=loader.plan(), start=0,
               dataset=loader.dataset, device=loader.device)  # fmt: skip


def _facts(batches):
    return [(b.keys, b.labels.tolist(), b.width.tolist(), b.height.tolist(), b.skipped,
             b.key_hash.tolist(), [bytes(i) for i in b.images]) for b in batches]  # fmt: skip


@pytest.mark.parametrize("mapped", [False, True], ids=["copied", "mapped"])
def test_samples_are_worked_out_once_and_read_the_same_ever_after(corrupt_ds, monkeypatch,
                                                                   mapped):  # fmt: skip
    """A shard's labels, image checks and key hashes are worked out when its samples are
    first read; reading them again checks nothing and gives the same batches, the corrupt
    samples skipped again."""
    root, bad = corrupt_ds
    checked = []
    real = columns.inspect_many
    monkeypatch.setattr(columns, "inspect_many",
                        lambda buf, starts, sizes: (checked.append(len(starts)),
                                                    real(buf, starts, sizes))[1])  # fmt: skip
    cfg = LoaderConfig(data=root, batch_size=4, image_size=32, recipe="small", num_workers=0,
                       shuffle_buffer=8)  # fmt: skip
    with build_loader(cfg, World()) as loader:
        loader.dataset.map_local = mapped
        first = list(encoded_batches(_job(loader), views=True))
        checks = sum(checked)
        again = list(encoded_batches(_job(loader), views=True))
    assert checks >= sum(b.labels.size for b in first) and sum(checked) == checks
    assert _facts(again) == _facts(first)
    # the truncated and the headless JPEG; the third passes the byte checks (a decoder's)
    skipped = {k for b in first for k in b.skipped}
    assert len(skipped) == 2 and skipped <= bad


def _cols(shard, keys, label, origin=None, problems=None):
    n = len(keys)
    images = [f"<{k}>".encode() for k in keys]
    size = np.array([len(i) for i in images], dtype=np.int64)
    return columns.Columns(
        shard=shard, keys=np.array(keys, dtype=object), bufs=[b"".join(images)], part=None,
        start=np.cumsum(size) - size, size=size, label=np.array(label, dtype=np.int64),
        key_hash=np.arange(n, dtype=np.uint64), width=np.ones(n, np.int32),
        height=np.ones(n, np.int32), problems=problems or {},
        origin=None if origin is None else np.array(origin, dtype=np.int64),
    )  # fmt: skip


def test_a_batch_gathered_from_units_with_a_stand_in_from_an_unmapped_one_carries_images():
    """Rows gathered from two units in the batch's order; a corrupt row stands in for by an
    earlier batch's last valid sample, whose shard is not mapped: the batch, all of whose
    own units are mapped, then carries its images instead of origins."""
    from pipeline.reader import _Gathered

    class Held:
        cols = {0: _cols(5, ["a", "b", "c"], [0, 1, 2], origin=[10, 20, 30], problems={1: "x"}),
                1: _cols(6, ["d", "e"], [3, 4], origin=[40, 50])}  # fmt: skip

    earlier = _cols(7, ["z"], [9])  # read by copy: no origin
    unit, row = np.array([1, 0, 0, 1]), np.array([1, 0, 2, 0])
    got = _Gathered(Held(), unit, row, views=False, origins=True)
    assert got.origin is not None and got.images is None
    batch, _ = got.batch(0, None, lambda i: "?")  # stand-in: the batch's first valid row
    assert batch.keys == ["e", "a", "c", "d"] and batch.labels.tolist() == [4, 0, 2, 3]
    assert batch.origin[:, :2].tolist() == [[6, 50], [5, 10], [5, 30], [6, 40]]
    got = _Gathered(Held(), np.array([0, 0]), np.array([1, 1]), views=False, origins=True)
    batch, last = got.batch(1, (earlier, 0), lambda i: "?")
    assert batch.keys == ["z", "z"] and batch.skipped == ("b", "b") and batch.origin is None
    assert batch.images == [b"<z>", b"<z>"] and last == (earlier, 0)


def test_samples_read_whole_carry_extra_members_whenever_they_are_asked_for():
    """A shard read whole (no .idx) gives per-row extra members exactly when the dataset
    asks for some, even if none of its samples has them: units of shards with and without
    an index are gathered into one batch."""
    from shard_tools.format import RawSample

    raws = [RawSample("a", b"not an image", b"1", {}), RawSample("b", None, b"2", {})]
    asked = columns.from_raw(raws, 0, labelled=True, extra=("txt",))
    assert asked.extra == [{}, {}] and asked.label.tolist() == [1, 2]
    assert set(asked.problems) == {0, 1} and asked.problems[1] == columns.NO_IMAGE
    assert columns.from_raw(raws, 0, labelled=True, extra=()).extra is None
