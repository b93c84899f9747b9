"""Pack round trip on a small synthetic folder: layout, manifest, webdataset read-back."""

from __future__ import annotations

import json

import webdataset as wds

from shard_tools.config import PackConfig
from shard_tools.format import MANIFEST_NAME, read_manifest
from shard_tools.pack import pack
from shard_tools.synth import make_image_folder


def test_pack_folder_round_trip(tmp_path):
    src = make_image_folder(tmp_path / "src", num_classes=3, per_class=7, size=16)
    dest = tmp_path / "out"
    result = pack(PackConfig(src=str(src), dest=str(dest), max_count=8, workers=1), progress=False)
    m = read_manifest(str(dest))
    assert result.manifest == m
    assert m.samples == 21 and len(m.shards) == 3 and m.shard_sizes.tolist() == [8, 8, 5]
    assert m.classes == {"class00": 0, "class01": 1, "class02": 2}
    assert m.class_counts == {"class00": 7, "class01": 7, "class02": 7}
    assert (dest / MANIFEST_NAME).exists() and not (dest / ".journal").exists()
    files = sorted((src).rglob("*.jpg"))
    urls = [str(dest / s.name) for s in m.shards]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert sample["jpg"] == (src / meta["source"]).read_bytes()
        assert int(sample["cls"]) == m.classes[meta["class"]] == meta["label"]
        seen.append(meta["source"])
    assert seen == [str(f.relative_to(src)) for f in files]


def test_pack_to_memory_filesystem(small_src):
    import fsspec

    from shard_tools.verify import verify

    dest = "memory://packs/basic"
    m = pack(
        PackConfig(src=str(small_src), dest=dest, max_count=16, workers=2), progress=False
    ).manifest
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find("/packs/basic"))
    assert names == [
        "manifest.json",
        "manifest.shards",
        "rejected.jsonl",
        "shard-000000.idx",
        "shard-000000.tar",
        "shard-000001.idx",
        "shard-000001.tar",
    ]
    assert m.samples == 30 and verify(dest).ok
