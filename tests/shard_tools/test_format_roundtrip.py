"""The format's writer and its readers agree with each other and with tarfile, webdataset
and DALI: random keys (dots in folders, long names that need pax headers, non-ASCII),
upper-case and dotted extensions."""

from __future__ import annotations

import io
import random
import tarfile

import numpy as np
import pytest

from shard_tools.format import (
    ShardIndex,
    index_name,
    iter_tar,
    parse_index,
    scan_samples,
    slice_samples,
    split_name,
    tar_samples,
)
from shard_tools.tarwrite import ShardTarWriter, sample_chunk

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-éß水"
EXTS = ["jpg", "JPG", "png", "seg.png", "cls", "Cls", "json", "txt"]


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))


def _key(rng: random.Random, i: int) -> str:
    folders = [_word(rng, 1, 8) + rng.choice(["", ".v1", ".d.2"]) for _ in range(rng.randint(0, 3))]
    base = f"{i:04d}{_word(rng, 0, rng.choice([6, 60, 180]))}"  # some need more than 100 bytes
    return "/".join([*folders, base])


def _samples(seed: int, n: int = 25) -> list[tuple[str, list[tuple[str, bytes]]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        # Extensions are compared in lower case (webdataset lower-cases them): one per case.
        exts = list({e.lower(): e for e in rng.sample(EXTS, rng.randint(1, 4))}.values())
        out.append(
            (_key(rng, i), [(e, rng.randbytes(rng.choice([0, 1, 511, 512, 1300]))) for e in exts])
        )
    return out


def _write(samples) -> tuple[bytes, str]:
    buf = io.BytesIO()
    writer = ShardTarWriter(buf)
    for key, members in samples:
        writer.add_chunk(sample_chunk(key, members, plain=False))
    idx = writer.finish()
    return buf.getvalue(), idx


@pytest.mark.parametrize("seed", range(6))
def test_writer_and_readers_agree(seed, tmp_path):
    samples = _samples(seed)
    assert any(len(f"{k}.{e}".encode()) > 100 for k, ms in samples for e, _ in ms)
    data, idx = _write(samples)
    expected = {(k, e): d for k, ms in samples for e, d in ms}

    # Our whole-tar reader and tarfile see the same members, names and bytes.
    ours = {split_name(name): payload for name, _, payload in iter_tar(data)}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        theirs = {split_name(m.name): tf.extractfile(m).read() for m in tf if m.isfile()}
    assert ours == theirs == expected

    # Our streaming scan groups them into the written samples, in order.
    scanned = [
        (k, [(m.ext, m.data) for m in ms])
        for k, ms in scan_samples(io.BytesIO(data), read=lambda e: True)
    ]
    assert scanned == [(k, list(ms)) for k, ms in samples]

    # The index locates every member: slicing a range gives the same image and label.
    index = parse_index(idx)
    assert list(index.keys) == [k for k, _ in samples]
    whole = tar_samples(data)
    every = np.arange(len(samples))
    start, stop = int(index.begin.min()), int(index.end.max())
    assert slice_samples(data[start:stop], start, index, every) == whole
    extra = ("json", "txt", "seg.png")  # members asked for by extension, any case written
    assert slice_samples(data[start:stop], start, index, every, extra) == tar_samples(data, extra)
    for (key, members), raw in zip(samples, whole, strict=True):
        by = {e.lower(): d for e, d in members}  # a loader picks jpg, then jpeg, png, webp
        image = next((by[e] for e in ("jpg", "jpeg", "png", "webp") if e in by), None)
        assert raw.key == key and raw.image == image and raw.label == by.get("cls")

    # webdataset reads the same samples.
    import webdataset as wds

    tar = tmp_path / "shard-000000.tar"
    tar.write_bytes(data)
    got = {s["__key__"]: s for s in wds.WebDataset(str(tar), shardshuffle=False)}
    for key, members in samples:
        for ext, payload in members:
            assert got[key][ext.lower()] == payload


@pytest.mark.dali
@pytest.mark.parametrize("seed", range(3))
def test_dali_reads_what_the_writer_wrote(seed, tmp_path):
    """DALI's own readers.webdataset with the .idx the writer made: every member's bytes."""
    from nvidia.dali import fn, pipeline_def

    samples = _samples(seed, n=12)
    ext = "json"  # one extension every sample below has
    samples = [
        (k, [*[m for m in ms if m[0] != ext], (ext, f'{{"i": {i}}}'.encode())])
        for i, (k, ms) in enumerate(samples)
    ]
    data, idx = _write(samples)
    tar = tmp_path / "shard-000000.tar"
    tar.write_bytes(data)
    (tmp_path / index_name(tar.name)).write_text(idx)

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def pipe():
        return fn.readers.webdataset(paths=[str(tar)], index_paths=[str(tmp_path / index_name(tar.name))],
                                     ext=[ext], missing_component_behavior="error")  # fmt: skip

    p = pipe()
    p.build()
    (out,) = p.run()
    got = [bytes(np.asarray(out[i])) for i in range(len(samples))]
    assert got == [dict(ms)[ext] for _, ms in samples]


@pytest.mark.parametrize("seed", range(20))
def test_index_ranges_cover_the_samples_in_runs_bounded_by_gap_and_size(seed):
    """ShardIndex.ranges: sorted samples (pad repeats included) grouped in order into byte
    ranges; a new range wherever the gap to the last sample exceeds merge_gap or the range
    would exceed max_bytes (a single sample larger than that gets a range of its own)."""
    rng = np.random.default_rng(seed)
    n = 300
    size = rng.integers(1, 5000, n)
    gap = np.where(rng.random(n) < 0.1, rng.integers(0, 20000, n), 512)
    begin = np.cumsum(size + gap) - size
    index = ShardIndex(begin=begin, end=begin + size, keys=np.array(["k"] * n, dtype=object),
                       spans={}, image=np.zeros((n, 2)), label=np.zeros((n, 2)))  # fmt: skip
    picked = np.sort(rng.choice(n, size=rng.integers(1, 2 * n), replace=True))
    merge_gap, max_bytes = int(rng.integers(0, 10000)), int(rng.integers(1000, 60000))
    want, first = [], 0  # the rule, one sample at a time
    for i in range(1, len(picked) + 1):
        if (i == len(picked) or begin[picked[i]] - begin[picked[i - 1]] - size[picked[i - 1]]
                > merge_gap or begin[picked[i]] + size[picked[i]] - begin[picked[first]]
                > max_bytes):  # fmt: skip
            want.append((begin[picked[first]], begin[picked[i - 1]] + size[picked[i - 1]],
                         picked[first:i].tolist()))  # fmt: skip
            first = i
    got = [(a, b, ids.tolist()) for a, b, ids in index.ranges(picked, merge_gap, max_bytes)]
    assert got == want
