"""The columnar shard table (manifest format 3): round trips, laziness, refusals, old formats."""

from __future__ import annotations

import dataclasses
import json

import fsspec
import numpy as np
import pytest

from shard_tools.format import (
    MANIFEST_NAME,
    TABLE_NAME,
    Manifest,
    ManifestError,
    ShardInfo,
    index_name,
    read_manifest,
    write_manifest,
)
from shard_tools.format.table import COLUMNS, ShardTable, TextColumn


def _manifest(n: int, *, adopted: bool = False) -> Manifest:
    shards = [
        ShardInfo(
            name=f"dir/{i:05d}.train.tar" if adopted else f"shard-{i:06d}.tar",
            samples=i % 7 + 1,
            bytes=1000 + i,
            sha256=f"{i:064x}" if i % 2 else "",
            index=(f"dir-{i:05d}.idx" if adopted else index_name(f"shard-{i:06d}.tar"))
            if i % 5
            else None,
            first_key=f"k{i}/a",
            last_key=f"k{i}/z",
            etag=f'"{i}"' if adopted else None,
            labels=f"dir-{i:05d}.labels" if adopted else None,
        )
        for i in range(n)
    ]
    return Manifest(shards=tuple(shards), classes={"a": 0, "b": 1},
                    samples=sum(s.samples for s in shards), bytes=sum(s.bytes for s in shards),
                    base_url="s3://bucket/tars" if adopted else None)  # fmt: skip


def _write(root, m: Manifest) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(lambda name, data: (root / name).write_bytes(data), m)


@pytest.mark.parametrize("adopted", [False, True])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_round_trip_keeps_every_field(tmp_path, n, adopted):
    m = _manifest(n, adopted=adopted)
    if n == 0:
        m = dataclasses.replace(m, classes={})
    _write(tmp_path, m)
    back = read_manifest(str(tmp_path))
    assert back == m
    assert list(back.shards) == list(m.shards)  # row by row, None where None
    assert back.shard_sizes.tolist() == [s.samples for s in m.shards]
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["format_version"] == 3
    # Deterministic: the same manifest gives the same bytes.
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _write(tmp_path, back)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first


def test_a_reader_fetches_only_the_columns_it_uses(tmp_path):
    _write(tmp_path, _manifest(50))
    m = read_manifest(str(tmp_path))
    loaded = set(m.shards._cols)
    # Counts, names, index and labels files: what a loader needs; never the hashes or keys.
    assert loaded == {"samples", "bytes", "name", "index", "labels"}
    assert m.shards[3].sha256 == f"{3:064x}" and "sha256" in m.shards._cols
    assert m.shards.names[49] == "shard-000049.tar" and len(m.shards.names) == 50


def test_pack_names_and_index_names_beside_their_shards_are_stored_as_rules(tmp_path):
    m = _manifest(12)
    m = dataclasses.replace(m, shards=[dataclasses.replace(s, index=index_name(s.name))
                                       for s in m.shards])  # fmt: skip
    _, spec = m.shards.encode()
    assert spec["columns"]["index"] == {"encoding": "index_name"}
    assert spec["columns"]["name"] == {"encoding": "shard_name"}
    _write(tmp_path, m)
    back = read_manifest(str(tmp_path))
    assert list(back.shards.names) == [f"shard-{i:06d}.tar" for i in range(12)]
    assert back.shards[11].index == "shard-000011.idx" and back == m
    _, spec = _manifest(3, adopted=True).shards.encode()  # other names: stored as they are
    assert spec["columns"]["name"]["encoding"] == "lines"
    _, spec = _manifest(12).shards.encode()  # some shards without an index: stored as lines
    assert spec["columns"]["index"]["encoding"] == "lines"


def _rewrite(root, column: str, row: int, value) -> None:
    table = read_manifest(str(root)).shards
    cols = {c: table.column(c) for c in COLUMNS}
    if column in ("samples", "bytes"):
        cols[column] = np.array(cols[column]).copy()
        cols[column][row] = value
    else:
        values = list(cols[column])
        values[row] = value
        cols[column] = TextColumn.of(values)
    raw, spec = ShardTable(len(table), cols).encode()
    (root / TABLE_NAME).write_bytes(raw)
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["shard_table"] = spec
    (root / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("name", "../up.tar", "shard name must be a plain file name or a relative path"),
        ("name", "/abs.tar", "got '/abs.tar'"),
        ("name", "a//b.tar", "got 'a//b.tar'"),
        ("name", "a/./b.tar", "got 'a/./b.tar'"),
        ("name", "s3://b/x.tar", "got 's3://b/x.tar'"),
        ("name", "a\\b.tar", "relative path"),
        ("name", "", "got ''"),
        ("index", "../x.idx", "index name must be a plain file name, got '../x.idx'"),
        ("index", "sub/x.idx", "got 'sub/x.idx'"),
        ("labels", "..labels", "labels name must be a plain file name"),
        ("samples", -1, "negative samples"),
    ],
)
def test_a_value_the_format_refuses_is_named(tmp_path, column, value, message):
    _write(tmp_path, _manifest(20, adopted=True))
    _rewrite(tmp_path, column, 7, value)
    with pytest.raises(ManifestError, match="manifest.json") as caught:
        read_manifest(str(tmp_path))
    assert message in str(caught.value)


def test_hidden_and_dotted_names_that_are_allowed_still_read(tmp_path):
    _write(tmp_path, _manifest(5, adopted=True))
    _rewrite(tmp_path, "name", 2, "dir/.hidden/a.b.c.tar")
    assert read_manifest(str(tmp_path)).shards[2].name == "dir/.hidden/a.b.c.tar"


def test_a_damaged_or_foreign_table_is_refused(tmp_path):
    _write(tmp_path, _manifest(20))
    other = tmp_path / "other"
    _write(other, _manifest(21))
    (tmp_path / TABLE_NAME).write_bytes((other / TABLE_NAME).read_bytes())
    with pytest.raises(ManifestError, match="does not match the manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / TABLE_NAME).unlink()
    with pytest.raises(ManifestError, match="missing beside it"):
        read_manifest(str(tmp_path))


def test_format_2_manifests_read_as_they_are(tmp_path):
    m = _manifest(9, adopted=True)
    old = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name != "shards"}
    old["format_version"] = 2
    old["shards"] = [dataclasses.asdict(s) for s in m.shards]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old))
    back = read_manifest(str(tmp_path))
    assert list(back.shards) == list(m.shards) and back.format_version == 2
    bad = json.loads((tmp_path / MANIFEST_NAME).read_text())
    bad["shards"][0]["name"] = "../x.tar"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="shard name must be"):
        read_manifest(str(tmp_path))


def test_a_table_on_an_object_store_is_read_in_ranges(tmp_path):
    m = _manifest(30)
    fs = fsspec.filesystem("memory")
    write_manifest(lambda name, data: fs.pipe(f"/tbl/{name}", data), m)
    back = read_manifest("memory://tbl")
    assert back == m and back.shards[29].last_key == "k29/z"
