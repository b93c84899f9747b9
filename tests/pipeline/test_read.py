"""Reading shards: idx-located ranges vs whole-tar parsing, byte checks, failures."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import LoaderConfig
from pipeline.columns import to_sample
from pipeline.sanity import check_image
from pipeline.storage import Dataset, ShardReadError
from shard_tools.format import tar_samples


def _open(root, **kw) -> Dataset:
    return Dataset.open(LoaderConfig(data=root, batch_size=1, **kw))


def test_ranges_match_whole_tar(small_ds):
    ds = _open(small_ds)
    for shard, info in enumerate(ds.manifest.shards):
        whole = tar_samples((Path(small_ds) / info.name).read_bytes())
        assert len(whole) == info.samples
        every = ds.read_samples(shard, np.arange(info.samples))
        assert every == whole
        sub = np.array([i for i in range(info.samples) if i % 3 != 1])
        got = ds.read_samples(shard, sub)
        assert [s.key for s in got] == [whole[i].key for i in sub]
        assert all(to_sample(s).problem is None for s in got)


def test_small_max_read_splits_ranges(small_ds):
    ds = _open(small_ds, max_read_mb=1)
    ds.max_read_bytes = 10_000  # a few samples per request
    got = ds.read_samples(0, np.arange(17))
    assert [s.key for s in got] == [s.key for s in _open(small_ds).read_samples(0, np.arange(17))]


def test_labels_match_the_manifest_classes(small_ds):
    ds = _open(small_ds)
    samples = [to_sample(r) for r in ds.read_samples(0, np.arange(5))]
    assert all(0 <= s.label < ds.manifest.num_classes for s in samples)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buf, "PNG")
    return buf.getvalue()


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buf, "WEBP")
    return buf.getvalue()


def test_sanity_accepts_good_images():
    for data in (_jpeg(), _png(), _webp()):
        assert check_image(data) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_jpeg()[: len(_jpeg()) // 2], "end-of-image"),
        (_jpeg()[:20] + b"\x00" * 40 + _jpeg()[-2:], "marker"),
        (b"GIF89a" + b"\0" * 50, "magic"),
        (_png()[:-20], "IEND"),
        (_webp()[:-10], "truncated"),
        (b"", "bytes"),
    ],
    ids=["jpeg-truncated", "jpeg-garbage", "gif", "png-truncated", "webp-truncated", "empty"],
)
def test_sanity_rejects_broken_images(data, reason):
    assert reason in check_image(data)


def test_missing_shard_fails_naming_it(small_ds, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    os.remove(root / "shard-000003.tar")
    ds = _open(str(root), retries=1, retry_backoff_s=0)
    with pytest.raises(ShardReadError, match=r"shard-000003\.tar.*after 2 attempt"):
        ds.read_samples(3, np.arange(3))


def test_mapped_reads_equal_copied_reads(small_ds):
    # The reader process maps local shards (Dataset.map_local) instead of copying them.
    copied, mapped = _open(small_ds), _open(small_ds)
    mapped.map_local = True
    for shard, info in enumerate(copied.manifest.shards):
        sub = np.arange(0, info.samples, 2)
        want, got = copied.read_columns(shard, sub), mapped.read_columns(shard, sub)
        rows = np.arange(len(sub))
        assert [bytes(i) for i in got.images(rows, views=True)] == want.images(rows, views=False)
        for name in ("keys", "label", "width", "height"):
            assert getattr(got, name).tolist() == getattr(want, name).tolist()
        assert (got.problems, got.extra) == (want.problems, want.extra)
        assert want.origin is None and got.origin is not None
        with open(mapped.shard_path(shard), "rb") as f:  # where each image lies in the file
            data = f.read()
        spans = zip(got.origin.tolist(), got.size.tolist(), strict=True)
        assert [data[a : a + n] for a, n in spans] == [
            bytes(i) for i in got.images(rows, views=True)
        ]


@pytest.mark.parametrize("mapped", [False, True], ids=["copied", "mapped"])
def test_truncated_shard_fails_naming_it(small_ds, tmp_path, mapped):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    tar = root / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    ds = _open(str(root), retries=0)
    ds.map_local = mapped
    with pytest.raises(ShardReadError, match=r"shard-000001\.tar.*truncated"):
        ds.read_samples(1, np.arange(17))


def test_a_mapped_shard_is_mapped_once_and_a_shard_cut_short_since_is_a_clear_error(
    small_ds, tmp_path, monkeypatch
):
    """A dataset that maps keeps each shard file mapped across reads (its pages stay
    mapped for the next epoch); a shard truncated in place after it was mapped is a short
    read naming it at the next read, not a SIGBUS."""
    import shutil

    from pipeline import storage

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    ds = _open(str(root), retries=0)
    ds.map_local = True
    mapped = []
    real = storage._map_file
    monkeypatch.setattr(storage, "_map_file", lambda path: (mapped.append(path), real(path))[1])
    n = ds.manifest.shards[1].samples
    first = [bytes(i) for i in ds.read_columns(1, np.arange(n)).images(np.arange(n), views=True)]
    again = ds.read_columns(1, np.arange(n))
    assert [bytes(i) for i in again.images(np.arange(n), views=True)] == first
    assert len(mapped) == 1
    tar = root / "shard-000001.tar"
    with open(tar, "r+b") as f:  # in place: the same file, now shorter
        f.truncate(5000)
    with pytest.raises(ShardReadError, match=r"shard-000001\.tar.*truncated"):
        ds.read_columns(1, np.arange(n))


def test_retries_are_counted_in_the_epoch_report(small_ds, tmp_path):
    import dataclasses
    import shutil

    from pipeline import World, build_loader

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    os.remove(root / "shard-000005.tar")
    cfg = LoaderConfig(
        data=str(root), batch_size=8, image_size=32, recipe="small", num_workers=0,
        retries=2, retry_backoff_s=0, read_ahead=0,
    )  # fmt: skip
    loader = build_loader(cfg, World())
    with pytest.raises(ShardReadError):
        for _ in loader:
            pass
    assert loader.dataset.retried == 2
    assert loader.epoch_report().retries == 2
    loader.set_epoch(1)  # a new epoch counts from zero
    assert loader.epoch_report().retries == 0
    loader.close()
    clean = build_loader(dataclasses.replace(cfg, data=small_ds), World())
    list(clean)
    assert clean.epoch_report().retries == 0
    clean.close()


@pytest.mark.s3
def test_unreachable_s3_endpoint_is_a_shard_read_error(s3_server, s3_ds):
    # s3fs raises connection failures as botocore types (not OSError): they must be
    # retried and end as a ShardReadError naming the shard, like any other read error.
    import socket

    import s3fs

    url, options = s3_ds
    ds = _open(url, storage_options=options, retries=1, retry_backoff_s=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once closed
    ds.fs = s3fs.S3FileSystem(
        key=s3_server.access_key,
        secret=s3_server.secret_key,
        client_kwargs={"endpoint_url": dead, "region_name": "us-east-1"},
        config_kwargs={"retries": {"max_attempts": 1}},
        skip_instance_cache=True,
    )
    with pytest.raises(ShardReadError, match=r"index shard-000002\.idx .*after 2 attempt") as info:
        ds.read_samples(2, np.arange(3))
    assert "\n" not in str(info.value) and s3_server.secret_key not in str(info.value)
    assert ds.retried == 1


@pytest.mark.parametrize("mapped", [False, True], ids=["copied", "mapped"])
def test_only_storage_errors_are_retried(small_ds, tmp_path, monkeypatch, mapped):
    """Damaged bytes fail at once as ShardDataError (reading again gives the same); an
    error of this code (a ValueError/RuntimeError) is not dressed up as a read failure."""
    import shutil

    from pipeline import storage
    from pipeline.storage import ShardDataError

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    tar = root / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    ds = _open(str(root), retries=3, retry_backoff_s=10)  # a retry would take 10 s
    ds.map_local = mapped
    with pytest.raises(ShardDataError, match=r"shard shard-000001\.tar .* is damaged: .*truncated"):
        ds.read_samples(1, np.arange(17))
    assert ds.retried == 0

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in the slicer")

    monkeypatch.setattr(storage, "slice_samples", bug)
    ds = _open(small_ds, retries=3, retry_backoff_s=10)
    with pytest.raises(RuntimeError, match="a bug in the slicer") as caught:
        ds.read_samples(0, np.arange(3))
    assert type(caught.value) is RuntimeError and ds.retried == 0

    (root / "shard-000002.idx").write_text("v1.2 17\nnot an index line\n")
    ds = _open(str(root), retries=3, retry_backoff_s=10)
    with pytest.raises(ShardDataError, match=r"index shard-000002\.idx .* is damaged"):
        ds.read_samples(2, np.arange(3))


SCRIPT = """
from pipeline import LoaderConfig, World, build_loader

def count(loader):
    return sum(len(b) for b in loader)

loader = build_loader(LoaderConfig(data={data!r}, backend="torch", batch_size=8, image_size=32,
                                   recipe="small", num_workers=2), World())
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_without_a_main_guard_is_told_the_fix(small_ds, tmp_path, guarded):
    """The README's loader example as a plain script: workers re-import it. Unguarded, the
    first iteration names the script's line and the fix (no BrokenProcessPool)."""
    import subprocess
    import sys

    body = SCRIPT.format(data=str(small_ds))
    body += (
        'if __name__ == "__main__":\n    print("samples", count(loader))\n'
        if guarded
        else 'print("samples", count(loader))\n'
    )
    script = tmp_path / "train_script.py"
    script.write_text(body)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    if guarded:
        assert proc.returncode == 0 and "samples 120" in proc.stdout, proc.stderr
        return
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.torch_backend.WorkerStartError: ")
    line = body.splitlines().index('print("samples", count(loader))') + 1
    assert f"{script}:{line} iterates" in last and 'if __name__ == "__main__":' in last
    assert "BrokenProcessPool" not in proc.stderr


@pytest.mark.parametrize("mapped, origins", [(False, False), (True, False), (False, True)],
                         ids=["copied", "mapped", "copied-origins"])  # fmt: skip
def test_image_views_equal_copies_and_long_held_samples_get_their_own_bytes(small_ds, mapped,
                                                                            origins):  # fmt: skip
    """encoded_batches(views=True) hands out views of each read's buffer: the same bytes
    as copies, batch by batch; a sample held in the shuffle buffer for long gets bytes of
    its own, so that it alone does not keep its whole read in memory (also where origins
    are asked for but the shards are not mapped: object storage)."""
    from pipeline import World, build_loader
    from pipeline.loader import Job
    from pipeline.reader import encoded_batches

    cfg = LoaderConfig(data=small_ds, batch_size=4, image_size=32, recipe="small",
                       num_workers=0, shuffle_buffer=8, read_ahead=0)  # fmt: skip
    with build_loader(cfg, World()) as loader:
        loader.dataset.map_local = mapped
        job = Job(cfg=loader.cfg, world=loader.world, epoch=0, plan=loader.plan(), start=0,
                  dataset=loader.dataset, device=loader.device)  # fmt: skip
        copies = list(encoded_batches(job))
        views = list(encoded_batches(job, views=True, origins=origins))
    assert [b.keys for b in views] == [b.keys for b in copies]
    assert [[bytes(i) for i in b.images] for b in views] == [b.images for b in copies]
    # Every image is a view: of its read (tar headers and all), or, held for more than twice
    # the shuffle buffer, of a buffer holding exactly the images still to come of its read.
    images = [i for b in views for i in b.images]
    assert all(isinstance(i, memoryview) for i in images)
    held: dict[int, list] = {}
    for i in images:
        held.setdefault(id(i.obj), [i.obj, 0])[1] += len(i)
    own = [obj for obj, n in held.values() if n == len(obj)]
    assert own and len(own) < len(held)


def test_mapped_local_shards_are_read_in_order_while_the_kernel_reads_ahead(small_ds, monkeypatch):
    """Local shards the reader process maps: no reader threads; each read unit is
    announced to the kernel (posix_fadvise WILLNEED) read_ahead units before it is read;
    same samples as reading without any read-ahead."""
    import threading

    from pipeline import World, build_loader
    from pipeline.reader import InputReader
    from pipeline.storage import Dataset

    events = []
    real_need, real_read = Dataset.will_need, Dataset.read_columns
    monkeypatch.setattr(Dataset, "will_need", lambda self, shard, idx: (
        events.append(("need", shard, np.sort(idx).tolist())), real_need(self, shard, idx))[1])  # fmt: skip
    monkeypatch.setattr(Dataset, "read_columns", lambda self, shard, idx: (
        events.append(("read", shard, idx.tolist())), real_read(self, shard, idx))[1])  # fmt: skip
    cfg = LoaderConfig(data=small_ds, batch_size=4, image_size=32, recipe="small", num_workers=0)
    with build_loader(cfg, World()) as loader:
        loader.dataset.map_local = True
        ro = loader.plan().ranks_order
        pending = ro.pending(0)
        got = []
        before = set(threading.enumerate())  # other loaders' threads are not this test's
        for item in InputReader(loader.dataset, ro, pending, read_ahead=2):
            got.append(item)
            assert not any(t.name.startswith("shard-read")
                           for t in set(threading.enumerate()) - before)  # fmt: skip
        want = list(InputReader(loader.dataset, ro, pending, read_ahead=0))

    def rows(units):
        return [(k, bytes(i)) for c in units
                for k, i in zip(c.keys, c.images(np.arange(len(c)), views=True), strict=True)]  # fmt: skip

    assert rows(got) == rows(want) and sum(len(c) for c in got) == len(pending)
    needs = [e[1:] for e in events if e[0] == "need"]
    reads = [e[1:] for e in events if e[0] == "read"][: len(needs)]  # the first pass's
    assert needs == reads and len(reads) > 3
    for unit in reads:  # announced before its read, at most 2 units early
        announced = events.index(("need", *unit))
        read = events.index(("read", *unit))
        assert announced < read
        assert sum(e[0] == "read" for e in events[announced:read]) <= 2


def test_a_packed_batch_keeps_its_spans_equal_to_its_images_when_rows_are_replaced():
    from pipeline.reader import EncodedBatch

    images = [b"\xff\xd8aaa", b"\xff\xd8bb", b"\xff\xd8c", b"\xff\xd8dddd"]
    starts = np.cumsum([0] + [len(b) for b in images[:-1]])
    span = np.stack([starts, [len(b) for b in images]], axis=1).astype(np.int64)
    buffer = np.frombuffer(b"".join(images), dtype=np.uint8)
    enc = EncodedBatch(step=0, keys=list("wxyz"), images=images,
                       labels=np.arange(4, dtype=np.int64), skipped=(), packed=(buffer, span))  # fmt: skip
    out = enc.replaced([1, 3], 2, "refused")
    buf, sp = out.packed
    assert [bytes(buf[a : a + n]) for a, n in sp.tolist()] == out.images
    assert out.images == [images[0], images[2], images[2], images[2]]
    assert out.skipped == ("x", "z") and enc.packed[1].tolist() == span.tolist()  # a copy


def _file_bytes(ds, shard: int, at: int, n: int) -> bytes:
    with open(ds.shard_path(shard), "rb") as f:
        f.seek(at)
        return f.read(n)


def test_batch_origins_point_at_each_image_in_its_shard_file(small_ds, corrupt_ds, noidx_ds):
    """encoded_batches(origins=True) on mapped shards: each batch says where its images
    lie in the shard files (corrupt samples' stand-ins included) instead of carrying them,
    so that a consumer reading there gets the very bytes the batch would have; with a row
    replaced, the origin follows it. Where a shard is not mapped, or has no .idx (read
    whole), there is no origin and the batch carries its images."""
    from pipeline import World, build_loader
    from pipeline.loader import Job
    from pipeline.reader import encoded_batches

    def batches(root, mapped, origins=True):
        cfg = LoaderConfig(data=root, batch_size=4, image_size=32, recipe="small",
                           num_workers=0, shuffle_buffer=8)  # fmt: skip
        with build_loader(cfg, World()) as loader:
            loader.dataset.map_local = mapped
            job = Job(cfg=loader.cfg, world=loader.world, epoch=0, plan=loader.plan(),
                      start=0, dataset=loader.dataset, device=loader.device)  # fmt: skip
            return loader.dataset, list(encoded_batches(job, views=True, origins=origins))

    for root in (small_ds, corrupt_ds[0]):
        ds, got = batches(root, mapped=True)
        want = batches(root, mapped=False, origins=False)[1]
        assert [enc.keys for enc in got] == [enc.keys for enc in want]
        for enc, copied in zip(got, want, strict=True):
            assert enc.origin is not None and enc.origin.shape == (4, 3) and enc.images is None
            assert [_file_bytes(ds, *row) for row in enc.origin.tolist()] == [
                bytes(i) for i in copied.images
            ]
        assert any(enc.skipped for enc in got) == (root == corrupt_ds[0])
    enc = got[0].replaced([0], 2, "refused")
    assert enc.origin[0].tolist() == enc.origin[2].tolist() == got[0].origin[2].tolist()
    for root, mapped in ((small_ds, False), (noidx_ds, True)):
        assert all(enc.origin is None and len(enc.images) == 4
                   for enc in batches(root, mapped)[1])  # fmt: skip


def test_what_is_cached_of_the_shards_read_is_bounded_and_reads_stay_the_same(small_ds):
    """A dataset keeps parsed indexes and sample facts for at most cached_samples samples
    (the least recently used shards dropped, the latest kept whatever its size); a shard
    dropped is read again as it was read the first time."""
    unbounded, bounded = _open(small_ds), _open(small_ds)
    shards = bounded.manifest.shards
    bounded.cached_samples = int(shards.samples[0]) + 1  # about one shard
    for _ in range(2):
        for shard in range(len(shards)):
            n = int(shards.samples[shard])
            want, got = (
                unbounded.read_columns(shard, np.arange(n)),
                bounded.read_columns(shard, np.arange(n)),
            )
            for name in ("keys", "label", "width", "height", "key_hash"):
                assert getattr(got, name).tolist() == getattr(want, name).tolist()
            assert got.problems == want.problems
            cached = set(bounded._indexes) | set(bounded._facts)
            assert shard in cached
            assert sum(int(shards.samples[s]) for s in cached) <= bounded.cached_samples + n
    assert len(cached) < len(shards) == len(unbounded._indexes)
