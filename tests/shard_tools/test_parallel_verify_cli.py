"""Byte-identical output for any --workers; verify catches corruption; CLI contract."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest
from shardtest_helpers import tree_digest

from shard_tools.cli import main
from shard_tools.config import PackConfig
from shard_tools.pack import pack
from shard_tools.verify import verify


def test_workers_1_and_2_write_identical_bytes(small_src, tmp_path):
    digests = []
    for workers in (1, 2):
        dest = tmp_path / f"w{workers}"
        pack(
            PackConfig(
                src=str(small_src),
                dest=str(dest),
                max_count=9,
                shuffle=True,
                seed=3,
                workers=workers,
            ),
            progress=False,
        )
        digests.append(tree_digest(dest))
    assert digests[0] == digests[1]
    assert sum(name.endswith(".tar") for name in digests[0]) == 4


def test_max_bytes_caps_shard_files(small_src, tmp_path):
    dest = tmp_path / "out"
    m = pack(
        PackConfig(src=str(small_src), dest=str(dest), max_bytes=20_480, workers=1), progress=False
    ).manifest
    assert m.samples == 30 and len(m.shards) > 3
    assert all(s.bytes <= 20_480 for s in m.shards)


@pytest.fixture
def packed(small_src, tmp_path):
    dest = tmp_path / "packed"
    pack(PackConfig(src=str(small_src), dest=str(dest), max_count=10, workers=1), progress=False)
    return dest


def test_verify_good_flipped_and_missing(packed, capsys):
    assert verify(str(packed), decode=True).ok
    assert main(["verify", str(packed), "--decode"]) == 0
    assert "OK" in capsys.readouterr().out

    shard = packed / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01  # inside the first image's data
    shard.write_bytes(bytes(data))
    assert main(["verify", str(packed)]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: sha256 mismatch" in out
    assert "shard-000000.tar" not in out and "shard-000002.tar" not in out

    (packed / "shard-000002.tar").unlink()
    report = verify(str(packed))
    assert not report.ok
    assert "shard-000002.tar: missing" in report.problems


def test_verify_names_undecodable_sample(packed):
    shard = packed / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[512 : 512 + 16] = b"\x00" * 16  # wreck the first JPEG's header
    shard.write_bytes(bytes(data))
    report = verify(str(packed), decode=True)
    assert any(p.startswith("shard-000000.tar: sample 0000000000") for p in report.problems), (
        report.problems
    )


def test_inspect(packed, capsys):
    assert main(["inspect", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "30 samples in 3 shards" in out and "class02" in out and "16 / 16 / 16 px" in out
    assert main(["inspect", str(packed), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["image_sizes"]["images"] == 30
    assert [c["samples"] for c in info["classes"]] == [10, 10, 10]


@pytest.mark.parametrize("cut", [700, 1100, 0.5, 0.9])
def test_inspect_names_a_truncated_shard_in_one_line(packed, tmp_path, capsys, cut):
    """Cut inside a header, inside a member, or at a member boundary: never a traceback,
    never a silent count of fewer images."""
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(packed, root)
    tar = root / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: cut if isinstance(cut, int) else int(len(data) * cut)])
    assert main(["inspect", str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shard inspect: error: shard-000001.tar: ")
    assert main(["inspect", str(root), "--no-scan"]) == 0  # the manifest alone is intact


def test_help_lists_commands_and_key_options():
    out = subprocess.run(
        [sys.executable, "-m", "shard_tools.cli", "--help"], capture_output=True, text=True
    ).stdout
    for cmd in ("pack", "verify", "inspect", "index", "synth"):
        assert cmd in out
    out = subprocess.run(
        [sys.executable, "-m", "shard_tools.cli", "pack", "--help"], capture_output=True, text=True
    ).stdout
    for opt in (
        "--max-count",
        "--max-bytes",
        "--shuffle",
        "--seed",
        "--workers",
        "--resize-max-side",
        "--quality",
        "--format",
        "--resume",
        "--no-validate",
        "--strict",
        "--json",
        "--endpoint-url",
        "--profile",
        "--classes",
        "--fraction",
        "--max-pixels",
    ):
        assert opt in out, opt


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["pack", "a", "b", "--max-count", "0"], "--max-count"),
        (["pack", "a", "b", "--max-bytes", "12XB"], "--max-bytes"),
        (["pack", "a", "b", "--workers", "-1"], "--workers"),
        (["pack", "a", "b", "--format", "gif"], "--format"),
        (["pack", "a", "b", "--quality", "101"], "--quality"),
        (["pack", "a", "b", "--fraction", "1.5"], "--fraction"),
        (["pack", "a", "b", "--frobnicate"], "--frobnicate"),
        (["verify"], "DEST"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and "Traceback" not in err


def _evil_tar(path, kind):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        good = tarfile.TarInfo("0001.cls")
        good.size = 1
        tf.addfile(good, io.BytesIO(b"0"))
        bad = tarfile.TarInfo(
            {"dotdot": "../escape.jpg", "absolute": "/etc/evil.jpg", "link": "0002.jpg"}[kind]
        )
        if kind == "link":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            bad.size = 1
        tf.addfile(bad, io.BytesIO(b"x") if kind != "link" else None)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link"])
def test_unsafe_tar_source_is_refused(tmp_path, capsys, kind):
    tar = tmp_path / "evil.tar"
    _evil_tar(tar, kind)
    assert main(["pack", str(tar), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "refusing this tar" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_existing_dataset_is_not_overwritten(packed, small_src, capsys):
    assert main(["pack", str(small_src), str(packed)]) == 1
    assert "already holds a finished dataset" in capsys.readouterr().err
