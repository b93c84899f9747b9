"""CIFAR-10 train packed and read back by webdataset and by DALI's reader with our .idx files."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from shard_tools.config import PackConfig
from shard_tools.pack import pack
from shard_tools.verify import verify


def _read_with_dali(dest, manifest):
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    tars = [str(dest / s.name) for s in manifest.shards]
    idxs = [str(dest / s.index) for s in manifest.shards]

    @pipeline_def(batch_size=256, num_threads=2, device_id=None)
    def reader():
        jpg, cls, meta = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["jpg", "cls", "json"],
            missing_component_behavior="error",
            random_shuffle=False,
            name="reader",
        )
        return jpg, cls, meta

    pipe = reader()
    pipe.build()
    assert pipe.epoch_size("reader") == manifest.samples
    out = []
    while len(out) < manifest.samples:
        jpg, cls, meta = pipe.run()
        for i in range(len(jpg)):
            out.append(
                (
                    np.array(jpg[i]).tobytes(),
                    np.array(cls[i]).tobytes(),
                    np.array(meta[i]).tobytes(),
                )
            )
    return out[: manifest.samples]


def _check(cifar_root, dest, manifest, expected_count):
    train = cifar_root / "train"
    assert manifest.samples == expected_count and manifest.num_classes == 10
    assert sorted(manifest.classes) == sorted(p.name for p in train.iterdir())
    seen = set()
    urls = [str(dest / s.name) for s in manifest.shards]
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert sample["jpg"] == (train / meta["source"]).read_bytes()
        assert int(sample["cls"]) == manifest.classes[meta["source"].split("/")[0]]
        seen.add(meta["source"])
    assert len(seen) == expected_count
    return seen


def _check_dali(cifar_root, dest, manifest, seen):
    train = cifar_root / "train"
    dali_seen = set()
    for jpg, cls, raw in _read_with_dali(dest, manifest):
        meta = json.loads(raw)
        assert jpg == (train / meta["source"]).read_bytes()
        assert int(cls.decode("ascii")) == manifest.classes[meta["source"].split("/")[0]]
        dali_seen.add(meta["source"])
    assert dali_seen == seen


@pytest.mark.dali
def test_cifar_subset_round_trip(cifar_root, tmp_path):
    dest = tmp_path / "cifar"
    cfg = PackConfig(
        src=str(cifar_root / "train"), dest=str(dest), fraction=0.01, max_count=128, workers=2
    )
    m = pack(cfg, progress=False).manifest
    assert m.class_counts == {name: 50 for name in m.classes}
    seen = _check(cifar_root, dest, m, 500)
    _check_dali(cifar_root, dest, m, seen)
    assert verify(str(dest)).ok


@pytest.mark.slow
@pytest.mark.dali
def test_cifar_train_full_round_trip(cifar_root, tmp_path):
    dest = tmp_path / "cifar"
    m = pack(
        PackConfig(src=str(cifar_root / "train"), dest=str(dest), workers=2), progress=False
    ).manifest
    assert len(m.shards) == 5 and set(m.class_counts.values()) == {5000}
    seen = _check(cifar_root, dest, m, 50_000)
    _check_dali(cifar_root, dest, m, seen)
