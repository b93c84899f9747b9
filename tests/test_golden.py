"""Committed digests of what the format and the loader produce: refactors keep both exact.

The inputs are committed JPEGs (kept byte for byte by `shard pack`), so the shards
depend on shardflow's writer alone. SHARDFLOW_UPDATE_GOLDEN=1 rewrites the digests
(for a deliberate format change, which then also needs a format version bump).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline import LoaderConfig, World, build_loader
from shard_tools.config import PackConfig
from shard_tools.pack import pack

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
DIGESTS = GOLDEN / "digests.json"
UPDATE = os.environ.get("SHARDFLOW_UPDATE_GOLDEN") == "1"


def _check(name: str, value: object) -> None:
    digests = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    if UPDATE:
        digests[name] = value
        DIGESTS.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        return
    assert name in digests, f"no committed digest {name!r}: run with SHARDFLOW_UPDATE_GOLDEN=1"
    assert value == digests[name]


@pytest.fixture
def golden_ds(tmp_path, monkeypatch) -> Path:
    shutil.copytree(GOLDEN / "src", tmp_path / "src")
    monkeypatch.chdir(tmp_path)  # a relative SRC: the manifest records it as given
    cfg = PackConfig(src="src", dest="ds", max_count=10, shuffle=True, seed=7, workers=1)
    pack(cfg, progress=False)
    return tmp_path / "ds"


def test_packed_shards_match_the_committed_digests(golden_ds):
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(golden_ds.iterdir())
    }
    _check("pack", files)


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch.keys]


def _streams(root: str) -> dict[str, str]:
    out = {}
    base = dict(data=root, backend="torch", num_workers=0, image_size=8, recipe="small",
                batch_size=4, seed=5, shuffle_buffer=6)  # fmt: skip
    for world_size in (1, 3):
        for shuffle in (True, False):
            for remainder in ("pad", "drop"):
                cfg = LoaderConfig(**base, shuffle=shuffle, remainder=remainder)
                keys = []
                for rank in range(world_size):
                    with build_loader(cfg, World(rank=rank, world_size=world_size)) as loader:
                        for epoch in (0, 1):
                            loader.set_epoch(epoch)
                            keys += [f"{rank}:{epoch}:{k}" for k in _keys(loader)]
                name = f"world{world_size}-shuffle{int(shuffle)}-{remainder}"
                out[name] = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    # Elastic resume: 3 ranks take 2 steps, then 2 ranks finish the epoch.
    cfg = LoaderConfig(**base)
    keys = []
    state = None
    for rank in range(3):
        with build_loader(cfg, World(rank=rank, world_size=3)) as loader:
            it = iter(loader)
            keys += [f"old{rank}:{k}" for _ in range(2) for k in next(it).keys]
            state = loader.state_dict()
    for rank in range(2):
        with build_loader(cfg, World(rank=rank, world_size=2)) as loader:
            loader.load_state_dict(state)
            keys += [f"new{rank}:{k}" for k in _keys(loader)]
    out["elastic-3-to-2"] = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    return out


def test_loader_key_streams_match_the_committed_digests(golden_ds):
    _check("loader", _streams(str(golden_ds)))
