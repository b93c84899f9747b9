"""`shard pack --executor ray`: chunks packed by Ray tasks on a real local Ray cluster."""

from __future__ import annotations

import csv
import json
import socket
import sys
from pathlib import Path

import pytest
import webdataset as wds
from shardtest_helpers import assert_s3_pack_equals_local, tree_digest

from shard_tools.cli import main
from shard_tools.config import PackConfig
from shard_tools.format import read_manifest
from shard_tools.pack import PackError, pack
from shard_tools.synth import make_image_folder
from shard_tools.verify import verify

# 300 inputs, 40 per shard, 100 per chunk: 3 chunks of 40 + 40 + 20 samples.
RAY_OPTS = dict(max_count=40, ray_chunk_size=100, executor="ray", shuffle=True, seed=4)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real 2-CPU Ray cluster (head node processes) for the module; yields its address.

    This process does not join it: each pack connects with --ray-address and
    disconnects at its end, as the CLI does.
    """
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
        )
        try:
            yield cluster.address
        finally:
            cluster.shutdown()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("ray") / "src", num_classes=3, per_class=100, size=16, seed=7
    )


def _read_back(dest: Path, manifest) -> list[dict]:
    urls = [str(dest / s.name) for s in manifest.shards]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_ray_pack_round_trip_and_determinism(ray_cluster, src, tmp_path):
    dest = tmp_path / "a"
    result = pack(
        PackConfig(src=str(src), dest=str(dest), ray_address=ray_cluster, **RAY_OPTS),
        progress=False,
    )
    m = result.manifest
    assert (m.samples, m.num_classes, m.rejected) == (300, 3, 0)
    assert m.class_counts == {"class00": 100, "class01": 100, "class02": 100}
    assert [s.name for s in m.shards] == [f"shard-{i:06d}.tar" for i in range(9)]
    assert [s.samples for s in m.shards] == [40, 40, 20] * 3
    assert m.options["executor"] == "ray" and m.options["ray_chunk_size"] == 100
    assert read_manifest(str(dest)) == m
    # Every sample's bytes and label match its source; keys are the global input
    # positions: unique, and sorted in shard order across chunks.
    samples = _read_back(dest, m)
    keys = [s["__key__"] for s in samples]
    assert keys == [f"{i:010d}" for i in range(300)]
    assert [(s.first_key, s.last_key) for s in m.shards][3] == ("0000000100", "0000000139")
    labels = {}
    for s in samples:
        meta = json.loads(s["json"])
        assert s["jpg"] == (src / meta["source"]).read_bytes()
        assert int(s["cls"]) == meta["label"] == m.classes[meta["class"]]
        labels[meta["source"]] = meta["label"]
    assert len(labels) == 300
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [s.name for s in m.shards]
        + [s.index for s in m.shards]
        + ["manifest.json", "manifest.shards", "rejected.jsonl"]
    )  # no chunk folders, journal or temp files left
    assert verify(str(dest), decode=True).ok
    assert main(["verify", str(dest)]) == 0
    # Same input and chunk size: byte-identical output, also on a Ray instance
    # that the packer starts itself (no --ray-address).
    again = tmp_path / "b"
    pack(PackConfig(src=str(src), dest=str(again), workers=2, **RAY_OPTS), progress=False)
    assert tree_digest(again) == tree_digest(dest)
    import ray

    assert not ray.is_initialized()  # the packer shut its own Ray down


def test_whole_shards_per_chunk_equal_a_local_pack(ray_cluster, src, tmp_path):
    # A chunk size that is a multiple of --max-count (and no rejections): the
    # chunks cut no extra shards, so the shards equal a local pack's, byte for byte.
    common = dict(src=str(src), max_count=30, shuffle=True, seed=1, classes=("class00", "class02"))
    local = pack(PackConfig(dest=str(tmp_path / "l"), workers=1, **common), progress=False)
    ray_ = pack(
        PackConfig(
            dest=str(tmp_path / "r"),
            executor="ray",
            ray_address=ray_cluster,
            ray_chunk_size=60,
            **common,
        ),
        progress=False,
    )
    assert ray_.manifest.samples == 200 and ray_.manifest.num_classes == 2
    assert [(s.name, s.sha256, s.index) for s in ray_.manifest.shards] == [
        (s.name, s.sha256, s.index) for s in local.manifest.shards
    ]


def _csv_source(tmp_path: Path, src: Path) -> tuple[Path, list[str], set[str]]:
    """A manifest source whose bad rows fall across chunks of 10: inside chunk 0
    and at its end, all of chunk 1 (a chunk with no shard), the end of chunk 2."""
    good = sorted(str(p) for p in (src / "class00").glob("*.jpg"))[:16]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    gone = [str(tmp_path / f"gone-{i}.jpg") for i in range(12)]
    rows = [*good[:3], str(empty), *good[3:8], gone[0]]  # chunk 0
    rows += gone[1:11]  # chunk 1
    rows += [*good[8:16], gone[11], str(empty)]  # chunk 2
    table = tmp_path / "list.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([p, "class00"] for p in rows)
    return table, rows, {str(empty), *gone}


def test_rejections_merged_in_input_order(ray_cluster, src, tmp_path):
    table, rows, bad = _csv_source(tmp_path, src)
    common = dict(src=str(table), max_count=4)
    pack(PackConfig(dest=str(tmp_path / "l"), workers=1, **common), progress=False)
    result = pack(
        PackConfig(
            dest=str(tmp_path / "r"),
            executor="ray",
            ray_address=ray_cluster,
            ray_chunk_size=10,
            **common,
        ),
        progress=False,
    )
    m = result.manifest
    assert (m.samples, m.rejected) == (16, 14)
    # Chunk 0 (8 good): 4 + 4; chunk 1: no shard; chunk 2 (8 good): 4 + 4.
    assert [s.samples for s in m.shards] == [4, 4, 4, 4]
    assert [s.name for s in m.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    rejected = (tmp_path / "r" / "rejected.jsonl").read_text()
    assert rejected == (tmp_path / "l" / "rejected.jsonl").read_text()
    assert [json.loads(x)["path"] for x in rejected.splitlines()] == [p for p in rows if p in bad]
    keys = [s["__key__"] for s in _read_back(tmp_path / "r", m)]
    assert keys == [f"{i:010d}" for i, p in enumerate(rows) if p not in bad]
    assert verify(str(tmp_path / "r")).ok


def test_resume_skips_finished_chunks(ray_cluster, tmp_path):
    src = make_image_folder(tmp_path / "src", num_classes=3, per_class=20, size=16, seed=2)
    bad = src / "class02" / "19.jpg"  # the last input
    assert bad.exists()
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:40])  # truncated: rejected, and --strict stops the pack
    opts = ["--max-count", "8", "--executor", "ray", "--ray-address", ray_cluster]
    args = ["pack", str(src), str(tmp_path / "out"), *opts, "--ray-chunk-size", "20", "--strict"]
    assert main(args) == 1
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert main(args) == 1  # an unfinished pack is not overwritten without --resume
    bad.write_bytes(good_bytes)
    assert main([*args, "--resume", "--json"]) == 0
    assert main(["pack", str(src), str(tmp_path / "ref"), *opts, "--ray-chunk-size", "20"]) == 0
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "ref")


def test_resume_result_counts_kept_shards(ray_cluster, tmp_path):
    src = make_image_folder(tmp_path / "src", num_classes=2, per_class=20, size=16, seed=5)
    bad = src / "class01" / "zz-bad.jpg"  # the last input: chunk 4 holds it alone
    bad.write_bytes(b"not an image")
    cfg = dict(
        src=str(src),
        dest=str(tmp_path / "out"),
        max_count=5,
        executor="ray",
        ray_address=ray_cluster,
        ray_chunk_size=10,
        strict=True,
    )
    with pytest.raises(PackError, match="--strict: rejected"):
        pack(PackConfig(**cfg), progress=False)
    bad.write_bytes((src / "class01" / "00.jpg").read_bytes())  # fixed: the listing is unchanged
    result = pack(PackConfig(**cfg, resume=True), progress=False)
    # Chunk 4 is submitted only once one of chunks 0..3 (4 in flight on 2 CPUs)
    # has finished, so at least that chunk's 2 shards are kept.
    assert result.resumed_shards >= 2
    assert result.manifest.samples == 41 and len(result.manifest.shards) == 9
    assert verify(str(tmp_path / "out"), decode=True).ok


@pytest.mark.s3
def test_ray_pack_to_s3(ray_cluster, src, tmp_path, s3_server, s3_prefix, monkeypatch):
    # No AWS_* variables here: the tasks get the credentials as storage options through Ray.
    for key in s3_server.env():
        monkeypatch.delenv(key, raising=False)
    opts = s3_server.storage_options()
    cfg = dict(src=str(src), ray_address=ray_cluster, **RAY_OPTS)
    local = pack(PackConfig(dest=str(tmp_path / "l"), **cfg), progress=False).manifest
    remote = pack(PackConfig(dest=s3_prefix, **cfg), storage_options=opts, progress=False).manifest
    assert_s3_pack_equals_local(local, remote, s3_prefix, opts)
    assert verify(s3_prefix, decode=True, storage_options=opts).ok


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_missing_ray_is_one_line(small_src, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    assert main(["pack", str(small_src), str(tmp_path / "o"), "--executor", "ray"]) == 1
    assert "pip install 'shardflow[ray]'" in _one_error_line(capsys)


def test_unreachable_address_is_one_line(small_src, tmp_path, capsys):
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    args = ["pack", str(small_src), str(tmp_path / "o"), "--executor", "ray"]
    assert main([*args, "--ray-address", f"127.0.0.1:{port}"]) == 1
    assert "cannot reach a Ray cluster at 127.0.0.1" in _one_error_line(capsys)
    assert main([*args, "--ray-address", "nonsense"]) == 1
    assert "--ray-address" in _one_error_line(capsys)


def test_ray_options_need_the_ray_executor(small_src, tmp_path, capsys):
    args = ["pack", str(small_src), str(tmp_path / "o"), "--ray-chunk-size", "10"]
    assert main(args) == 2
    assert "need --executor ray" in _one_error_line(capsys)
