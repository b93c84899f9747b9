"""Existing webdataset tars as they are: adopt, labels from anywhere, captions through, loud failures."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from foreign_tars import CLASS_NAMES, caption, hf_layout, img2dataset, jpeg, write_tar
from shardtest_helpers import read_rejected

from pipeline import LoaderConfig, World, build_loader
from shard_tools.cli import main
from shard_tools.format import read_manifest

REPO = Path(__file__).resolve().parents[2]


def _loader_cfg(data, **kw) -> LoaderConfig:
    base = dict(data=str(data), backend="torch", num_workers=0, batch_size=4, image_size=16,
                recipe="small", seed=3, shuffle_buffer=8)  # fmt: skip
    return LoaderConfig(**{**base, **kw})


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _train_one_step(data: Path, out: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "train", "--data", str(data), "--backend", "torch",
            "--num-workers", "0", "--out", str(out), "--batch-size", "8", "--max-steps", "1",
            "--epochs", "1"]  # fmt: skip
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_img2dataset_tars_adopt_read_in_place_and_train(tmp_path, capsys):
    tars = img2dataset(tmp_path / "i2d")
    dest = tmp_path / "adopted"
    before = {p: p.read_bytes() for p in tars}
    assert main(["adopt", str(tmp_path / "i2d" / "{00000..00002}.tar"), "--manifest-to", str(dest),
                 "--label", "json:label"]) == 0  # fmt: skip
    m = read_manifest(str(dest))
    assert (m.samples, len(m.shards), m.classes) == (24, 3, {"0": 0, "1": 1, "2": 2})
    assert m.base_url == str(tmp_path / "i2d") and [s.name for s in m.shards] == [
        p.name for p in tars
    ]
    assert all(p.read_bytes() == data for p, data in before.items())  # the tars are untouched
    with build_loader(_loader_cfg(dest, shuffle=False, train=False), World()) as loader:
        rows = [
            (k, int(lab)) for b in loader for k, lab in zip(b.keys, b.labels.tolist(), strict=True)
        ]
    assert rows == [(f"{n:09d}", n % 3) for n in range(24)]
    proc = _train_one_step(dest, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_hf_layout_with_class_names_adopts_and_trains(tmp_path):
    hf_layout(tmp_path / "hf")
    dest = tmp_path / "adopted"
    assert main(["adopt", str(tmp_path / "hf" / "train-*.tar"), "--manifest-to", str(dest),
                 "--label", "json:label"]) == 0  # fmt: skip
    m = read_manifest(str(dest))
    assert m.classes == {name: i for i, name in enumerate(sorted(CLASS_NAMES))}
    with build_loader(_loader_cfg(dest, shuffle=False, train=False), World()) as loader:
        labels = [int(x) for b in loader for x in b.labels.tolist()]
    assert labels[:18] == [sorted(CLASS_NAMES).index(CLASS_NAMES[n % 3]) for n in range(18)]
    classes = tmp_path / "classes.txt"
    classes.write_text("fox\ndog\ncat\n")
    fixed = tmp_path / "fixed"
    assert main(["adopt", str(tmp_path / "hf" / "train-*.tar"), "--manifest-to", str(fixed),
                 "--label", "json:label", "--classes-from", str(classes)]) == 0  # fmt: skip
    assert read_manifest(str(fixed)).classes == {"fox": 0, "dog": 1, "cat": 2}
    proc = _train_one_step(fixed, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_pack_that_keeps_nothing_fails_and_says_what_to_try(tmp_path, capsys):
    img2dataset(tmp_path / "i2d")
    dest = tmp_path / "packed"
    assert main(["pack", str(tmp_path / "i2d" / "*.tar"), str(dest)]) == 1
    line = _one_line(capsys)
    assert "kept 0 of 24 samples" in line and "24 x sample has no .cls label" in line
    assert "did you mean --label json:label?" in line and "--unlabelled" in line
    assert not (dest / "manifest.json").exists()
    assert (
        main(["adopt", str(tmp_path / "i2d" / "*.tar"), "--manifest-to", str(tmp_path / "a")]) == 1
    )
    assert "did you mean --label json:label?" in _one_line(capsys)
    # A folder of foreign tars is named as such, with the command that reads it.
    with pytest.raises(ValueError, match=r"holds 3 tar\(s\).*shard adopt"):
        build_loader(_loader_cfg(tmp_path / "i2d"), World())


def test_repack_keeps_captions_and_json_byte_for_byte(tmp_path):
    tars = img2dataset(tmp_path / "i2d", shards=2)
    dest = tmp_path / "packed"
    assert main(["pack", str(tmp_path / "i2d" / "*.tar"), str(dest), "--label", "json:label",
                 "--workers", "1"]) == 0  # fmt: skip
    originals = {}
    for tar in tars:
        with tarfile.open(tar) as tf:
            for m in tf:
                originals[m.name] = tf.extractfile(m).read()
    import webdataset as wds

    m = read_manifest(str(dest))
    seen = 0
    for s in wds.WebDataset([str(dest / x.name) for x in m.shards], shardshuffle=False):
        meta = json.loads(s["shardflow.json"])
        key = meta["source"].rsplit("#", 1)[1]
        assert s["txt"] == originals[f"{key}.txt"] and s["json"] == originals[f"{key}.json"]
        assert int(s["cls"]) == json.loads(originals[f"{key}.json"])["label"]
        seen += 1
    assert seen == 16
    with build_loader(_loader_cfg(dest, extra_members=("txt", "json")), World()) as loader:
        batch = next(iter(loader))
    for text in batch.extra["txt"]:
        assert text is not None and text.startswith("a photo number")


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("dali-cpu", marks=pytest.mark.dali), "device-cache"])  # fmt: skip
def test_captions_stay_aligned_across_resume_and_elastic_resume(tmp_path, backend):
    img2dataset(tmp_path / "i2d", shards=3, per_shard=11)
    dest = tmp_path / "adopted"
    assert main(["adopt", str(tmp_path / "i2d" / "*.tar"), "--manifest-to", str(dest),
                 "--unlabelled"]) == 0  # fmt: skip
    kw = dict(extra_members=("txt",), batch_size=3)
    kw |= (
        {"backend": "torch", "cache": "device"}
        if backend == "device-cache"
        else {"backend": backend}
    )

    def check(batch):
        assert batch.labels.tolist() == [-1] * len(batch)  # unlabelled: the loader says so
        assert batch.extra["txt"] == [caption(k) for k in batch.keys]
        return list(batch.keys)

    def run(world, state=None, take=None):
        keys = []
        for rank in range(world):
            with build_loader(
                _loader_cfg(dest, **kw), World(rank=rank, world_size=world)
            ) as loader:
                if state is not None:
                    loader.load_state_dict(state)
                it = iter(loader)
                for i, batch in enumerate(it):
                    keys += check(batch)
                    if take is not None and i + 1 == take:
                        break
                saved = loader.state_dict()
        return keys, saved

    whole, _ = run(2)
    first, state = run(2, take=2)
    rest, _ = run(2, state)
    assert sorted(first + rest) == sorted(whole)
    rest3, _ = run(3, state)  # elastic: the rest over 3 ranks
    assert set(first + rest3) == set(whole) and len(set(whole)) == 33


def _cls_tar(path: Path, keys: list[str], *, upper: bool = False, grouped: bool = True) -> Path:
    img, cls = ("JPG", "CLS") if upper else ("jpg", "cls")
    pairs = [
        [(f"{k}.{img}", jpeg(i)), (f"{k}.{cls}", str(i % 2).encode())] for i, k in enumerate(keys)
    ]
    members = (
        [m for pair in pairs for m in pair]
        if grouped
        else [p[0] for p in pairs] + [p[1] for p in pairs]
    )
    return write_tar(path, members)


def test_upper_case_members_and_unsorted_tars(tmp_path, capsys):
    keys = [f"k{i:02d}" for i in range(20)]
    _cls_tar(tmp_path / "upper" / "u.tar", keys, upper=True)
    _cls_tar(tmp_path / "unsorted" / "s.tar", keys, grouped=False)
    for name in ("upper", "unsorted"):
        dest = tmp_path / f"packed-{name}"
        assert main(["pack", str(tmp_path / name / "*.tar"), str(dest), "--workers", "1"]) == 0
        m = read_manifest(str(dest))
        assert m.samples == 20 and m.classes == {"0": 0, "1": 1}
    assert (
        main(["adopt", str(tmp_path / "upper" / "u.tar"), "--manifest-to", str(tmp_path / "a1")])
        == 0
    )
    assert read_manifest(str(tmp_path / "a1")).samples == 20
    capsys.readouterr()
    assert (
        main(["adopt", str(tmp_path / "unsorted" / "s.tar"), "--manifest-to", str(tmp_path / "a2")])
        == 1
    )
    line = _one_line(capsys)
    assert "members of sample k00 are not adjacent" in line and "shard pack" in line


def test_keys_with_several_dots_are_rejected_with_the_reason(tmp_path, capsys):
    members = [(f"a.b{i}.jpg", jpeg(i)) for i in range(10)] + [("a.cls", b"1")]
    write_tar(tmp_path / "dots" / "d.tar", members)
    assert main(["pack", str(tmp_path / "dots" / "d.tar"), str(tmp_path / "out")]) == 1
    line = _one_line(capsys)
    assert "kept 0 of 1 samples" in line and "several image members share one key" in line
    assert "first dot of a file name" in line


def test_gzip_compressed_tars_pack_adopt_and_read(tmp_path):
    img2dataset(tmp_path / "gz", shards=2, per_shard=6, gz=True)
    packed = tmp_path / "packed"
    assert main(["pack", str(tmp_path / "gz" / "*.tar.gz"), str(packed), "--label", "json:label",
                 "--workers", "1"]) == 0  # fmt: skip
    assert read_manifest(str(packed)).samples == 12
    adopted = tmp_path / "adopted"
    assert main(["adopt", str(tmp_path / "gz" / "*.tar.gz"), "--manifest-to", str(adopted),
                 "--label", "json:label", "--hash"]) == 0  # fmt: skip
    m = read_manifest(str(adopted))
    assert m.samples == 12 and all(s.index is None and s.sha256 for s in m.shards)
    with build_loader(
        _loader_cfg(adopted, shuffle=False, train=False, extra_members="txt"), World()
    ) as loader:
        rows = [
            (k, int(lab), t)
            for b in loader
            for k, lab, t in zip(b.keys, b.labels.tolist(), b.extra["txt"], strict=True)
        ]
    assert rows == [(f"{n:09d}", n % 3, caption(f"{n:09d}")) for n in range(12)]
    assert main(["verify", str(adopted)]) == 0


def test_index_names_never_collide(tmp_path, capsys):
    for n in (1, 2):
        _cls_tar(tmp_path / f"a.train.{n:05d}.tar", [f"x{n}{i}" for i in range(3)])
    assert main(["index", str(tmp_path / "a.train.*.tar")]) == 0
    assert {p.name for p in tmp_path.glob("*.idx")} == {"a.train.00001.idx", "a.train.00002.idx"}
    assert (
        main(["adopt", str(tmp_path / "a.train.*.tar"), "--manifest-to", str(tmp_path / "m")]) == 0
    )
    m = read_manifest(str(tmp_path / "m"))
    assert len({s.index for s in m.shards}) == 2 and m.samples == 6


def test_readopt_notices_a_changed_tar(tmp_path, capsys):
    tars = img2dataset(tmp_path / "i2d")
    dest = tmp_path / "adopted"
    args = ["adopt", str(tmp_path / "i2d" / "*.tar"), "--manifest-to", str(dest), "--label",
            "json:label", "--json"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    img2dataset(tmp_path / "other", shards=1, per_shard=5)  # a different 00000.tar
    tars[0].write_bytes((tmp_path / "other" / "00000.tar").read_bytes())
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["changed"] == [str(tars[0])] and summary["unchanged"] == 2
    assert summary["samples"] == 5 + 16
    with build_loader(_loader_cfg(dest, shuffle=False, train=False), World()) as loader:
        assert sum(len(b) for b in loader) == 21 + (-21 % 4)


@pytest.mark.s3
def test_adopt_tars_on_s3_with_the_manifest_elsewhere(tmp_path, s3_server, s3_env):
    import fsspec

    opts = s3_server.storage_options()
    fs = fsspec.filesystem("s3", **opts)
    prefix = f"{s3_server.bucket}/adopt-{tmp_path.name}"
    for tar in img2dataset(tmp_path / "i2d"):
        fs.put_file(str(tar), f"{prefix}/{tar.name}")
    dest = tmp_path / "adopted"  # local: the bucket stays read-only
    assert main(["adopt", f"s3://{prefix}/*.tar", "--manifest-to", str(dest), "--label",
                 "json:label"]) == 0  # fmt: skip
    m = read_manifest(str(dest))
    assert m.base_url == f"s3://{prefix}" and m.samples == 24 and all(s.etag for s in m.shards)
    cfg = _loader_cfg(dest, shuffle=False, train=False)
    with build_loader(cfg, World()) as loader:
        labels = [int(x) for b in loader for x in b.labels.tolist()]
    assert labels == [n % 3 for n in range(24)]
    assert main(["verify", str(dest)]) == 0


def test_manifest_sources_take_the_same_label_options(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rows = []
    for i in range(9):
        (src / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append({"path": f"{i}.jpg", "kind": CLASS_NAMES[i % 3], "caption": f"c{i}"})
    table = src / "list.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "by-column"
    assert main(["pack", str(table), str(out), "--label", "kind", "--workers", "1"]) == 0
    assert read_manifest(str(out)).classes == {"cat": 0, "dog": 1, "fox": 2}
    none = tmp_path / "none"
    assert main(["pack", str(table), str(none), "--unlabelled", "--workers", "1"]) == 0
    m = read_manifest(str(none))
    assert not m.labelled and m.classes == {} and m.samples == 9
    assert read_rejected(none) == {}
    train = _train_one_step(none, tmp_path / "run")
    assert train.returncode == 1 and "is unlabelled" in train.stderr
