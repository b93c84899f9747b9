"""Fixtures: small datasets packed once per session with the real `shard pack` writer."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from pathlib import Path

import pytest

from shard_tools.format import read_manifest, write_manifest
from shard_tools.pack import PackConfig, pack
from shard_tools.synth import make_image_folder

NUM_CLASSES = 4
PER_CLASS = 30  # 120 samples
MAX_COUNT = 17  # -> 8 shards, the last one holding a single sample


@pytest.fixture(scope="session")
def small_src(tmp_path_factory) -> Path:
    """A labelled folder of 120 synthetic 32 px JPEGs in 4 classes."""
    return make_image_folder(
        tmp_path_factory.mktemp("src") / "images",
        num_classes=NUM_CLASSES,
        per_class=PER_CLASS,
        size=32,
    )


@pytest.fixture(scope="session")
def small_ds(tmp_path_factory, small_src) -> str:
    """The folder packed into 8 uneven shards (local disk)."""
    dest = tmp_path_factory.mktemp("packed") / "ds"
    pack(
        PackConfig(src=str(small_src), dest=str(dest), max_count=MAX_COUNT, workers=1),
        progress=False,
    )
    return str(dest)


@pytest.fixture(scope="session")
def noidx_ds(tmp_path_factory, small_ds) -> str:
    """The same shards as plain webdataset tars: no .idx files (read whole, parsed)."""
    dest = tmp_path_factory.mktemp("noidx") / "ds"
    shutil.copytree(small_ds, dest)
    manifest = read_manifest(str(dest))
    for shard in manifest.shards:
        (dest / shard.index).unlink()
    shards = [dataclasses.replace(s, index=None) for s in manifest.shards]
    write_manifest(lambda name, data: (dest / name).write_bytes(data),
                   dataclasses.replace(manifest, shards=shards))  # fmt: skip
    return str(dest)


def _members(idx_line: str) -> dict[str, tuple[int, int, str]]:
    parts = idx_line.split()
    return {
        parts[j]: (int(parts[j + 1]), int(parts[j + 2]), parts[j + 3])
        for j in range(0, len(parts), 4)
    }


def _find_marker(buf: bytearray, start: int, marker: int) -> int:
    pos = start + 2
    while buf[pos + 1] != marker:
        pos += 2 + int.from_bytes(buf[pos + 2 : pos + 4], "big")
    return pos


@pytest.fixture(scope="session")
def corrupt_ds(tmp_path_factory, small_ds) -> tuple[str, set[str]]:
    """A copy whose shard 2 holds a truncated JPEG (end overwritten with zeros), one with
    a destroyed header and one whose frame names an undefined quantisation table (passes
    the byte checks, fails every decoder); returns (root, keys of the corrupt samples)."""
    dest = tmp_path_factory.mktemp("corrupt") / "ds"
    shutil.copytree(small_ds, dest)
    lines = (dest / "shard-000002.idx").read_text().splitlines()[1:]
    tar = bytearray((dest / "shard-000002.tar").read_bytes())
    bad = set()
    for sample, how in ((3, "tail"), (11, "head"), (7, "quant")):
        offset, size, name = _members(lines[sample])["jpg"]
        if how == "tail":
            tar[offset + size // 2 : offset + size] = bytes(size - size // 2)
        elif how == "head":
            tar[offset : offset + 16] = b"this is not jpeg"
        else:
            sof = _find_marker(tar, offset, 0xC0)
            tar[sof + 12] = 3  # first component's quantisation table selector
        bad.add(name.split(".", 1)[0])
    (dest / "shard-000002.tar").write_bytes(bytes(tar))
    return str(dest), bad


@pytest.fixture(scope="session")
def s3_ds(s3_server, small_src) -> tuple[str, dict]:
    """The folder packed straight onto the SeaweedFS server; (url, storage_options)."""
    url = f"s3://{s3_server.bucket}/pipeline-{uuid.uuid4().hex[:8]}/ds"
    options = s3_server.storage_options()
    pack(
        PackConfig(src=str(small_src), dest=url, max_count=MAX_COUNT, workers=1),
        storage_options=options,
        progress=False,
    )
    return url, options
