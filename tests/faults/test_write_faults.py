"""Bad images at write time: N inputs of every kind through the real `shard pack` CLI.

Each kind is its own class folder, so the manifest's per-class counts give the
packed count of each kind. Root reads a mode-000 file anyway, so when the
tests run as root the packer runs without the capabilities that let root
ignore file modes (``setpriv`` drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
from its bounding set): "unreadable" then means what it means for any user.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from PIL import Image

from shard_tools.format import read_manifest
from tests.faults.faulthelpers_rw import (
    jpeg,
    jpeg_with_size,
    png,
    random_bytes,
    read_rejected,
    run_shard,
)

N = 3  # inputs of each kind
# Runs a command as root minus the capabilities that bypass file modes.
NO_DAC_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _truncated(i: int) -> bytes:
    data = jpeg(i, size=(64, 64))
    return data[: len(data) * 2 // 3]  # headers intact, the scan cut off


def _unreadable(path: Path, i: int) -> None:
    path.write_bytes(jpeg(100 + i))
    path.chmod(0)


def _non_utf8(path: Path, i: int) -> None:
    # "café-<i>.jpg" in Latin-1: the byte 0xE9 alone is not valid UTF-8.
    raw = os.fsencode(path.parent) + b"/caf\xe9-" + str(i).encode() + b".jpg"
    with open(raw, "wb") as f:
        f.write(jpeg(200 + i))


# kind -> (write input i at path, packed?, substring of the rejection reason)
KINDS = {
    "truncated_jpeg": (lambda p, i: _write(p, _truncated(i)), False, "undecodable"),
    "zero_bytes": (lambda p, i: _write(p, b""), False, "empty file"),
    "random_bytes_named_jpg": (lambda p, i: _write(p, random_bytes(i)), False, "not an image"),
    "png_named_jpg": (lambda p, i: _write(p, png(10 + i)), True, ""),
    "cmyk_jpeg": (lambda p, i: _write(p, jpeg(20 + i, "CMYK")), True, ""),
    "grayscale_jpeg": (lambda p, i: _write(p, jpeg(30 + i, "L")), True, ""),
    "png_16bit": (lambda p, i: _write(p, png(40 + i, "I;16")), True, ""),
    "one_by_one": (lambda p, i: _write(p, jpeg(50 + i, size=(1, 1))), True, ""),
    "bomb_20000x20000_header": (
        lambda p, i: _write(p, jpeg_with_size(60 + i, 20_000, 20_000)),
        False,
        "decompression bomb: 20000x20000",
    ),
    "unreadable_mode_000": (_unreadable, False, "permission denied"),
    "fifo_named_jpg": (lambda p, i: os.mkfifo(p), False, "not a regular file"),
    "broken_symlink": (lambda p, i: os.symlink(f"gone-{i}.jpg", p), False, "file not found"),
    "non_utf8_file_name": (_non_utf8, True, ""),
}


def _packer_prefix() -> tuple[str, ...] | None:
    """How to run the packer so that file modes bind it; None where that is impossible."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        return None
    ok = subprocess.run([*NO_DAC_OVERRIDE, "true"], capture_output=True).returncode == 0
    return NO_DAC_OVERRIDE if ok else None


def shown(rel: str) -> str:
    """How the packer names an input: bytes that are not UTF-8 escaped as \\xNN."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _make_inputs(src: Path) -> dict[str, list[str]]:
    """Write N inputs per kind; return kind -> their names as the packer records them."""
    for kind, (make, _, _) in KINDS.items():
        folder = src / kind
        folder.mkdir(parents=True)
        for i in range(N):
            make(folder / f"{i}.jpg", i)
    listed: dict[str, list[str]] = {}
    for kind in KINDS:
        names = sorted(os.listdir(src / kind))
        listed[kind] = [shown(f"{kind}/{n}") for n in names]
        assert len(names) == N, (kind, names)
    return listed


def _packed_sources(dest: Path) -> dict[str, list[tuple[str, Image.Image]]]:
    """class -> [(source, decoded image)] of every packed sample."""
    out: dict[str, list[tuple[str, Image.Image]]] = {}
    for shard in sorted(dest.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            meta = json.loads(data)
            key = name[: -len(".json")]
            ext = next(e for e in ("jpg", "png", "webp") if f"{key}.{e}" in members)
            img = Image.open(io.BytesIO(members[f"{key}.{ext}"]))
            img.load()
            out.setdefault(meta["class"], []).append((meta["source"], img))
    return out


def test_bad_images_are_counted_rejected_and_never_crash(tmp_path, figures):
    src, dest = tmp_path / "src", tmp_path / "out"
    listed = _make_inputs(src)
    prefix = _packer_prefix()
    kinds = dict(KINDS)
    if prefix is None:
        # Root that cannot shed its capabilities reads mode-000 files: they are packed.
        kinds["unreadable_mode_000"] = (_unreadable, True, "")
    proc = run_shard(
        [
            "pack",
            src,
            dest,
            "--workers",
            "2",
            "--max-count",
            "8",
            "--json",
            "--max-reject-fraction",
            "1",
        ],
        prefix=prefix or (),  # fmt: skip
    )
    crashed_run = proc.returncode != 0 or "Traceback" in proc.stderr
    rejected = read_rejected(dest) if not crashed_run else {}
    manifest = read_manifest(str(dest)) if not crashed_run else None
    packed = _packed_sources(dest) if not crashed_run else {}

    for kind in kinds:
        n_rej = sum(1 for path in rejected if path in listed[kind])
        n_packed = manifest.class_counts.get(kind, 0) if manifest else 0
        reasons = [rejected[p] for p in listed[kind][:1] if p in rejected]
        figures(
            "write",
            kind.replace("_", " "),
            inputs=N,
            packed=n_packed,
            rejected=n_rej,
            crashed=N - n_packed - n_rej,
            reason="; ".join(reasons) if reasons else "-",
            **(
                {"note": "run as root with mode bits ignored"} if kinds[kind] != KINDS[kind] else {}
            ),
        )

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == "", proc.stderr
    expected_rejected = {p for k, (_, ok, _) in kinds.items() if not ok for p in listed[k]}
    assert set(rejected) == expected_rejected  # exactly the bad ones, each once
    for kind, (_, ok, reason) in kinds.items():
        if ok:
            assert manifest.class_counts[kind] == N, kind
            assert sorted(s for s, _ in packed[kind]) == listed[kind], kind
            assert all(img.mode in ("L", "RGB") for _, img in packed[kind]), kind
        else:
            assert manifest.class_counts[kind] == 0 and kind not in packed, kind
            for path in listed[kind]:
                assert reason in rejected[path], (path, rejected[path])
    summary = json.loads(proc.stdout)
    assert summary["samples"] == N * sum(ok for _, ok, _ in kinds.values())
    assert summary["rejected"] == len(expected_rejected) == manifest.rejected
    # The odd-but-valid inputs are stored as what they really are.
    assert {img.format for _, img in packed["png_named_jpg"]} == {"PNG"}
    assert {img.size for _, img in packed["one_by_one"]} == {(1, 1)}
    assert {img.mode for _, img in packed["cmyk_jpeg"]} == {"RGB"}
    assert {img.mode for _, img in packed["grayscale_jpeg"]} == {"L"}
    # A name that is not UTF-8 is recorded with its odd byte escaped, not lost.
    assert [s for s, _ in packed["non_utf8_file_name"]] == [
        f"non_utf8_file_name/caf\\xe9-{i}.jpg" for i in range(N)
    ]
