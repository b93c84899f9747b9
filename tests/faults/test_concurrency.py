"""Concurrency and load: several packers and readers on one S3 bucket at once.

- 4 ``shard pack`` processes (the real CLI) write 4 prefixes of one bucket at
  the same time; every result must be byte-identical to a local pack of the
  same input and options.
- 8 reader processes (2 ranks x 4 readers per rank) stream the same shards at
  the same time; each must hand out exactly the key sequence of its rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import s3fs

from pipeline import LoaderConfig, World, build_loader
from shard_tools.config import PackConfig
from shard_tools.format import read_manifest
from shard_tools.pack import pack
from shard_tools.synth import make_image_folder

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.multiproc]

NUM_CLASSES = 8
PER_CLASS = 40  # 320 samples
IMAGE_PX = 48
MAX_COUNT = 20  # 16 shards
PACKERS = 4
RANKS = 2
READERS_PER_RANK = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("conc-src") / "images",
        num_classes=NUM_CLASSES,
        per_class=PER_CLASS,
        size=IMAGE_PX,
        seed=9,
    )


def _cli_env(server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env.update(server.env())
    return env


def _pack_argv(src: Path, dest: str, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shard_tools.cli",
        "pack",
        str(src),
        dest,
        "--max-count",
        str(MAX_COUNT),
        "--shuffle",
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--json",
    ]


@pytest.mark.timeout(300)
def test_four_packers_write_one_bucket_at_once(images, tmp_path, s3_server, figures):
    root = f"s3://{s3_server.bucket}/conc-{uuid.uuid4().hex[:8]}"
    dests = [f"{root}/packer-{i}" for i in range(PACKERS)]
    env = _cli_env(s3_server)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            _pack_argv(images, dest, seed=i),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, dest in enumerate(dests)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    seconds = time.perf_counter() - t0
    errors = sum(p.returncode != 0 for p in procs)
    assert errors == 0, [err for _, err in outs]
    # Each packer's own time (without interpreter start-up); they overlapped.
    pack_s = max(json.loads(out)["seconds"] for out, _ in outs)

    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    total_bytes = 0
    for i, dest in enumerate(dests):
        local = tmp_path / f"local-{i}"
        ref = pack(
            PackConfig(
                src=str(images),
                dest=str(local),
                max_count=MAX_COUNT,
                shuffle=True,
                seed=i,
                workers=1,
            ),
            progress=False,
        ).manifest
        got = read_manifest(dest, s3_server.storage_options())
        assert [(s.name, s.sha256, s.bytes, s.index) for s in got.shards] == [
            (s.name, s.sha256, s.bytes, s.index) for s in ref.shards
        ]
        assert got.samples == NUM_CLASSES * PER_CLASS
        for s in ref.shards:  # the objects themselves, not only what the manifest claims
            data = fs.cat_file(f"{dest}/{s.name}")
            assert hashlib.sha256(data).hexdigest() == s.sha256
            assert fs.cat_file(f"{dest}/{s.index}") == (local / s.index).read_bytes()
        names = {p.rsplit("/", 1)[1] for p in fs.find(dest.removeprefix("s3://"))}
        assert not any(n.endswith(".json") and n != "manifest.json" for n in names)  # no journal
        total_bytes += got.bytes
    samples = PACKERS * NUM_CLASSES * PER_CLASS
    figures(
        "concurrency",
        f"{PACKERS} packers (CLI processes), one bucket, 4 prefixes",
        processes=PACKERS,
        samples=samples,
        wall_s=round(seconds, 2),
        busy_s=round(pack_s, 2),
        img_per_s=round(samples / pack_s, 1),
        mb_per_s=round(total_bytes / 1e6 / pack_s, 2),
        errors=errors,
        outcome="all manifests and objects byte-identical to local packs",
    )


READER = r"""
import json, os, sys, time
from pathlib import Path
from pipeline import LoaderConfig, World, build_loader

import torchvision.io, torchvision.transforms.v2  # imported before the clock starts

spec = json.loads(sys.argv[1])
cfg = LoaderConfig(**spec["cfg"])
loader = build_loader(cfg, World(rank=spec["rank"], world_size=spec["world_size"]))
Path(spec["ready"]).touch()
go = Path(spec["go"])
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
t0 = time.perf_counter()
keys = [k for batch in loader for k in batch.keys]
seconds = time.perf_counter() - t0
ended = time.time()  # wall clock: compared across processes
report = loader.epoch_report()
loader.close()
print(json.dumps({"keys": keys, "seconds": seconds, "ended": ended, "retries": report.retries,
                  "repeated": report.repeated}))
"""


def _reader_cfg(url: str, options: dict | None) -> dict:
    return dict(
        data=url,
        backend="torch",
        batch_size=16,
        image_size=32,
        recipe="small",
        seed=4,
        shuffle_buffer=64,
        num_workers=0,
        storage_options=options,
    )


@pytest.mark.timeout(300)
def test_eight_readers_stream_the_same_shards(images, tmp_path, s3_server, figures):
    url = f"s3://{s3_server.bucket}/conc-read-{uuid.uuid4().hex[:8]}/ds"
    local = tmp_path / "local"
    for dest, opts in ((url, s3_server.storage_options()), (str(local), None)):
        pack(
            PackConfig(src=str(images), dest=dest, max_count=MAX_COUNT, workers=1),
            storage_options=opts,
            progress=False,
        )
    # What each rank must see: the same config on the local copy.
    expected = {}
    for rank in range(RANKS):
        loader = build_loader(
            LoaderConfig(**_reader_cfg(str(local), None)), World(rank=rank, world_size=RANKS)
        )
        expected[rank] = [k for b in loader for k in b.keys]
        loader.close()
    everything = set(expected[0]) | set(expected[1])
    assert len(everything) == NUM_CLASSES * PER_CLASS

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    go = tmp_path / "go"
    procs = []
    for n in range(RANKS * READERS_PER_RANK):
        rank = n % RANKS
        spec = {
            "cfg": _reader_cfg(url, s3_server.storage_options()),
            "rank": rank,
            "world_size": RANKS,
            "ready": str(tmp_path / f"ready-{n}"),
            "go": str(go),
        }
        procs.append(
            (
                rank,
                subprocess.Popen(
                    [sys.executable, "-c", READER, json.dumps(spec)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    # Start streaming together once every reader has imported and opened the dataset.
    readers = RANKS * READERS_PER_RANK
    results, failures = [], []
    try:
        deadline = time.monotonic() + 180
        while sum((tmp_path / f"ready-{n}").exists() for n in range(readers)) < readers:
            assert all(p.poll() is None for _, p in procs), "a reader died while starting"
            assert time.monotonic() < deadline, "readers did not start"
            time.sleep(0.05)
        started = time.time()
        go.touch()
        for rank, p in procs:
            out, err = p.communicate(timeout=180)
            if p.returncode != 0:
                failures.append(err.strip().splitlines()[-1:] or [f"exit {p.returncode}"])
                continue
            results.append((rank, json.loads(out.strip().splitlines()[-1])))
    finally:
        for _, p in procs:  # a failed start must not leave readers waiting for the go
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = len(failures)
    assert errors == 0, failures
    seconds = max(r["ended"] for _, r in results) - started  # go to the last epoch's end
    for rank, res in results:
        assert res["keys"] == expected[rank]
        assert res["retries"] == 0
    samples = sum(len(r["keys"]) for _, r in results)
    busy_s = max(r["seconds"] for _, r in results)  # the slowest reader's own epoch
    manifest = read_manifest(url, s3_server.storage_options())
    mb = samples * manifest.bytes / manifest.samples / 1e6
    figures(
        "concurrency",
        f"{readers} readers ({RANKS} ranks x {READERS_PER_RANK}), same shards",
        processes=readers,
        samples=samples,
        wall_s=round(seconds, 2),
        busy_s=round(busy_s, 2),
        img_per_s=round(samples / seconds, 1),
        mb_per_s=round(mb / seconds, 2),
        errors=errors,
        outcome="every reader saw exactly its rank's key sequence",
    )
