"""Manifest-file sources, tar re-sharding, class/fraction subsets and shuffling."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from shard_tools.config import PackConfig
from shard_tools.format import read_manifest
from shard_tools.pack import pack
from shard_tools.sources import SourceError, list_source, select


def _samples(dest):
    m = read_manifest(str(dest))
    return [
        (json.loads(s["json"]), int(s["cls"]), s)
        for s in wds.WebDataset([str(dest / sh.name) for sh in m.shards], shardshuffle=False)
    ]


def _rows(src):
    return [
        {"path": str(p.relative_to(src)), "label": p.parent.name, "split": "train", "weight": i}
        for i, p in enumerate(sorted(src.rglob("*.jpg")))
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_sources_keep_extra_columns(small_src, tmp_path, fmt):
    rows = _rows(small_src)
    table = small_src / f"list.{fmt}"
    if fmt == "csv":
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), table)
    dest = tmp_path / "out"
    m = pack(PackConfig(src=str(table), dest=str(dest), workers=1), progress=False).manifest
    assert m.samples == 30 and m.classes == {"class00": 0, "class01": 1, "class02": 2}
    for meta, label, sample in _samples(dest):
        assert sample["jpg"] == (small_src / meta["source"]).read_bytes()
        assert label == m.classes[meta["class"]]
        extra = meta["extra"]
        assert extra["split"] == "train" and int(extra["weight"]) >= 0


def test_integer_labels_and_missing_columns(small_src, tmp_path):
    table = small_src / "ints.jsonl"
    table.write_text(
        "".join(
            json.dumps({"path": r["path"], "label": int(r["label"][-1])}) + "\n"
            for r in _rows(small_src)
        )
    )
    src = list_source(str(table))
    assert src.classes == {"0": 0, "1": 1, "2": 2}
    bad = small_src / "bad.jsonl"
    bad.write_text(json.dumps({"file": "x.jpg"}) + "\n")
    with pytest.raises(SourceError, match="lacks column"):
        list_source(str(bad))


def test_reshard_tars_round_trip(small_src, tmp_path):
    first = tmp_path / "first"
    pack(PackConfig(src=str(small_src), dest=str(first), max_count=7, workers=1), progress=False)
    second = tmp_path / "second"
    pattern = str(first / "shard-{000000..000004}.tar")
    m = pack(
        PackConfig(src=pattern, dest=str(second), max_count=100, workers=2), progress=False
    ).manifest
    assert m.samples == 30 and len(m.shards) == 1
    assert m.classes == read_manifest(str(first)).classes
    originals = sorted((s["jpg"], label) for _, label, s in _samples(first))
    resharded = sorted((s["jpg"], label) for _, label, s in _samples(second))
    assert resharded == originals
    for meta, label, _ in _samples(second):
        assert meta["source"].startswith(str(first)) and label == meta["label"]
    glob_dest = tmp_path / "third"
    m3 = pack(
        PackConfig(src=str(first / "*.tar"), dest=str(glob_dest), workers=1), progress=False
    ).manifest
    assert m3.samples == 30


def test_class_and_fraction_subsets(small_src):
    listed = list_source(str(small_src))
    only = select(listed, classes=("class02", "class00"), fraction=None, shuffle=False, seed=0)
    assert only.classes == {"class00": 0, "class02": 1}
    assert len(only.items) == 20 and {it.label for it in only.items} == {0, 1}
    part = select(listed, classes=None, fraction=0.3, shuffle=False, seed=4)
    again = select(listed, classes=None, fraction=0.3, shuffle=False, seed=4)
    other = select(listed, classes=None, fraction=0.3, shuffle=False, seed=5)
    assert part.items == again.items != other.items
    assert [sum(it.label == k for it in part.items) for k in range(3)] == [3, 3, 3]
    mixed = select(listed, classes=None, fraction=None, shuffle=True, seed=1)
    assert sorted(mixed.items) == sorted(listed.items) and mixed.items != listed.items
    with pytest.raises(SourceError, match="unknown class 'nope'"):
        select(listed, classes=("nope",), fraction=None, shuffle=False, seed=0)


def test_reencode_resize_and_format(small_src, tmp_path):
    import io

    from PIL import Image

    dest = tmp_path / "out"
    pack(
        PackConfig(
            src=str(small_src),
            dest=str(dest),
            resize_max_side=8,
            image_format="webp",
            quality=80,
            workers=1,
        ),
        progress=False,
    )
    for meta, _, sample in _samples(dest):
        img = Image.open(io.BytesIO(sample["webp"]))
        assert img.format == "WEBP" and img.size == (8, 8) == (meta["width"], meta["height"])
