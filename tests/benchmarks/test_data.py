"""benchmarks.data: the inputs every suite shares, built from small archives made here."""

from __future__ import annotations

import csv
import tarfile
from pathlib import Path

import pytest

from benchmarks import data
from shard_tools.format import read_manifest
from shard_tools.synth import make_image_folder


@pytest.fixture
def shared(tmp_path, monkeypatch) -> Path:
    """A shared-data folder with CIFAR-like and ImageNet-like archives of real JPEGs."""
    root = tmp_path / "shared"
    root.mkdir()
    for split, per_class in (("train", 5), ("test", 2)):
        make_image_folder(tmp_path / "cifar" / split, num_classes=3, per_class=per_class, size=32)
    with tarfile.open(root / data.CIFAR_ARCHIVE, "w:gz") as tf:
        tf.add(tmp_path / "cifar", arcname="cifar10")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, p in enumerate(sorted(make_image_folder(tmp_path / "gen", num_classes=2, per_class=2,
                                                   size=64).rglob("*.jpg"))):  # fmt: skip
        p.rename(photos / f"n0000000{i % 2}_{i}.JPEG")
    with tarfile.open(root / data.IMAGENET_ARCHIVE, "w") as tf:
        tf.add(photos, arcname="sample")
    monkeypatch.setenv("SHARDFLOW_SHARED_DATA", str(root))
    return root


def test_work_dir_is_temporary_unless_given(tmp_path):
    with data.work_dir(None, "t") as work:
        (work / "x").write_text("x")
    assert not work.exists()
    with data.work_dir(tmp_path / "kept", "t") as work:
        (work / "x").write_text("x")
    assert (tmp_path / "kept" / "x").exists()


def test_cifar_subset_is_even_and_in_name_order(shared, tmp_path):
    full = data.cifar10(tmp_path / "w", split="train")
    assert len(full.files) == 15 and sorted(set(full.labels)) == sorted(
        {p.parent.name for p in full.files}
    )
    sub = data.cifar10(tmp_path / "w", split="train", limit=20)  # 2 per class
    assert len(sub.files) == 6
    for cls in set(full.labels):
        first_two = sorted(p.name for p in full.files if p.parent.name == cls)[:2]
        assert sorted(p.name for p in sub.files if p.parent.name == cls) == first_two
    test = data.cifar10(tmp_path / "w", split="test")
    assert len(test.files) == 6 and set(test.labels) == set(full.labels)


def test_imagenet_copies_and_pack_once(shared, tmp_path):
    work = tmp_path / "w"
    src = data.imagenet_sample(work, limit=3, copies=2)
    rows = list(csv.DictReader(Path(src.src).read_text().splitlines()))
    assert len(rows) == 6 == len(src.files)
    assert [r["label"] for r in rows] == src.labels == [p.name.split("_")[0] for p in src.files]
    root = data.pack_once(src, work, max_count=4, workers=1, validate=False)
    manifest = Path(root) / "manifest.json"
    assert read_manifest(root).samples == 6 and len(read_manifest(root).shards) == 2
    before = manifest.stat().st_mtime_ns
    assert data.pack_once(src, work, max_count=4, workers=1, validate=False) == root
    assert manifest.stat().st_mtime_ns == before  # reused, not packed again


def test_missing_archives_give_none(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDFLOW_SHARED_DATA", str(tmp_path / "nothing"))
    assert data.cifar10(tmp_path) is None and data.imagenet_sample(tmp_path) is None
