"""Plain helper functions for the shard_tools tests (imported by name: tests are not a package)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ROOT."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_rejected(dest: Path) -> dict[str, str]:
    """path -> reason from DEST/rejected.jsonl."""
    rows = [json.loads(x) for x in (dest / "rejected.jsonl").read_text().splitlines()]
    return {r["path"]: r["reason"] for r in rows}


def wds2idx_binary() -> Path:
    """DALI's wds2idx console script next to this interpreter (skip the test without it)."""
    path = Path(sys.executable).parent / "wds2idx"
    if not path.exists():
        pytest.skip("DALI's wds2idx is not installed (the [dali] extra)")
    return path


def assert_s3_pack_equals_local(local, remote, prefix: str, opts: dict) -> None:
    """REMOTE (manifest of a pack to PREFIX) has LOCAL's shards byte for byte, reads
    back equal, and PREFIX holds only shards, indexes, the manifest and rejected.jsonl
    (no chunk, journal or temporary objects left behind)."""
    import fsspec

    from shard_tools.format import read_manifest

    assert [(s.name, s.sha256, s.bytes) for s in remote.shards] == [
        (s.name, s.sha256, s.bytes) for s in local.shards
    ]
    assert read_manifest(prefix, opts) == remote
    fs = fsspec.filesystem("s3", **opts)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(prefix.removeprefix("s3://")))
    expected = sorted(
        [s.name for s in local.shards]
        + [s.index for s in local.shards]
        + ["manifest.json", "manifest.shards", "rejected.jsonl"]
    )
    assert names == expected
