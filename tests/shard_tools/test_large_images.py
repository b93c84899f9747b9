"""Large kept images travel to the writer by reference: same bytes, and a changed file is caught."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import webdataset as wds

from shard_tools.config import PackConfig
from shard_tools.format import read_manifest
from shard_tools.pack import pack
from shard_tools.synth import make_image_folder
from shard_tools.tarwrite import ChangedFileError, FileRef, read_ref
from shard_tools.validate import BY_REFERENCE_MIN_BYTES


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    src = make_image_folder(
        tmp_path_factory.mktemp("big") / "src", num_classes=2, per_class=3, size=256, seed=1
    )
    sizes = [p.stat().st_size for p in src.rglob("*.jpg")]
    assert min(sizes) >= BY_REFERENCE_MIN_BYTES  # the case under test
    return src


def test_large_images_round_trip_from_folder_and_tar(big_src, tmp_path):
    first = tmp_path / "first"
    m = pack(
        PackConfig(src=str(big_src), dest=str(first), max_count=4, workers=2), progress=False
    ).manifest
    for sample in wds.WebDataset([str(first / s.name) for s in m.shards], shardshuffle=False):
        assert sample["jpg"] == (big_src / json.loads(sample["json"])["source"]).read_bytes()
    # Re-shard from the local tars: members are referenced inside the tar files.
    second = tmp_path / "second"
    pack(PackConfig(src=str(first / "*.tar"), dest=str(second), workers=2), progress=False)
    m2 = read_manifest(str(second))
    with tarfile.open(second / m2.shards[0].name) as tf:
        images = sorted(
            tf.extractfile(x).read() for x in tf.getmembers() if x.name.endswith(".jpg")
        )
    assert images == sorted(p.read_bytes() for p in big_src.rglob("*.jpg"))


def test_changed_file_is_detected(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    st = os.stat(path)
    ref = FileRef(str(path), 10, 50, (st.st_size, st.st_mtime_ns))
    assert read_ref(ref) == b"a" * 50
    path.write_bytes(b"b" * 101)
    with pytest.raises(ChangedFileError):
        read_ref(ref)


def test_tar_chunk_with_file_ref_equals_inline(tmp_path):
    from shard_tools.tarwrite import ShardTarWriter, sample_chunk

    data = os.urandom(70_000)
    path = tmp_path / "img.jpg"
    path.write_bytes(b"xx" + data)
    st = os.stat(path)
    members = [("jpg", data), ("cls", b"1")]
    inline, by_ref = io.BytesIO(), io.BytesIO()
    w1, w2 = ShardTarWriter(inline), ShardTarWriter(by_ref)
    w1.add_chunk(sample_chunk("0000000007", members))
    ref = FileRef(str(path), 2, len(data), (st.st_size, st.st_mtime_ns))
    w2.add_chunk(sample_chunk("0000000007", [("jpg", b""), ("cls", b"1")], file_ref=ref))
    assert (w1.finish(), w1.sha256) == (w2.finish(), w2.sha256)
    assert inline.getvalue() == by_ref.getvalue()


def test_no_validate_writes_the_same_shards(big_src, tmp_path):
    digests = []
    for validate in (True, False):
        dest = tmp_path / f"v{validate}"
        m = pack(
            PackConfig(src=str(big_src), dest=str(dest), validate=validate, workers=2),
            progress=False,
        ).manifest
        digests.append([(s.name, s.sha256) for s in m.shards])
    assert digests[0] == digests[1]
