"""Corrupt data at read time: damaged image bytes, a truncated or deleted shard, a deleted .idx.

Every backend that runs on a CPU reads the same damaged copy of a small
dataset (48 samples in 4 shards of 12, one rank, batch 8 = 6 steps). Damaged
images are replaced by a valid sample of their batch and counted; a shard or
index that cannot be read ends the epoch with one line that names the file.
`shard verify` must flag every fault too, even damage no decoder notices.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import LoaderConfig, World, build_loader
from pipeline.storage import ShardReadError
from shard_tools.config import PackConfig
from shard_tools.pack import pack
from shard_tools.synth import make_image_folder
from shard_tools.verify import verify
from tests.faults.faulthelpers_rw import (
    REPO,
    child_env,
    flip_bytes,
    image_spans,
    one_line_error,
    tree_digest,
)

SAMPLES, SHARD_SIZE, BATCH = 48, 12, 8
STEPS = SAMPLES // BATCH
DAMAGED = "shard-000001"  # the shard every fault hits
BACKENDS = {
    "torch": dict(backend="torch", num_workers=0),
    "dali-cpu": dict(backend="dali-cpu"),
    "device-cache": dict(backend="torch", cache="device"),
}


def _damage_headers(root: Path) -> set[str]:
    # The first 16 bytes of three images overwritten: no decoder can read them.
    spans = image_spans(root / f"{DAMAGED}.idx")
    tar = root / f"{DAMAGED}.tar"
    data = bytearray(tar.read_bytes())
    for _, offset, _ in (spans[2], spans[5], spans[9]):
        data[offset : offset + 16] = b"definitely!jpeg?"
    tar.write_bytes(bytes(data))
    return {spans[i][0] for i in (2, 5, 9)}


def _flip_bytes(root: Path) -> set[str]:
    # 12 random bytes (seeded) of three images XORed: the damage a bad disk or RAM does.
    spans = image_spans(root / f"{DAMAGED}.idx")
    picked = [spans[i] for i in (1, 6, 10)]
    flip_bytes(root / f"{DAMAGED}.tar", [(off, size) for _, off, size in picked], 12, seed=8)
    return {key for key, _, _ in picked}


def _shard_keys(root: Path) -> set[str]:
    return {key for key, _, _ in image_spans(root / f"{DAMAGED}.idx")}


def _truncate(root: Path) -> set[str]:
    tar = root / f"{DAMAGED}.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    return _shard_keys(root)


def _delete_shard(root: Path) -> set[str]:
    keys = _shard_keys(root)
    (root / f"{DAMAGED}.tar").unlink()
    return keys


def _delete_idx(root: Path) -> set[str]:
    keys = _shard_keys(root)
    (root / f"{DAMAGED}.idx").unlink()
    return keys


# fault -> (damage the copy and return the keys of damaged samples, what the reader does)
FAULTS = {
    "image headers overwritten (3 samples)": (_damage_headers, "replace"),
    "12 bytes flipped in 3 images": (_flip_bytes, "replace"),
    "shard truncated to half": (_truncate, "fail"),
    "shard deleted": (_delete_shard, "fail"),
    ".idx deleted": (_delete_idx, "fail"),
}
# The cause each failing fault must name, besides the file.
CAUSES = {
    "shard truncated to half": (f"{DAMAGED}.tar", "truncated"),
    "shard deleted": (f"{DAMAGED}.tar", "No such file"),
    ".idx deleted": (f"{DAMAGED}.idx", "No such file"),
}


@pytest.fixture(scope="module")
def clean_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("read-faults")
    src = make_image_folder(root / "src", num_classes=3, per_class=16, size=32, seed=7)
    dest = root / "ds"
    pack(PackConfig(src=str(src), dest=str(dest), max_count=SHARD_SIZE, workers=1), progress=False)
    return dest


def _damaged_copy(clean_ds: Path, tmp_path: Path, fault: str) -> tuple[Path, set[str]]:
    root = tmp_path / "ds"
    shutil.copytree(clean_ds, root)
    return root, FAULTS[fault][0](root)


def _all_keys(clean_ds: Path) -> set[str]:
    return {key for p in clean_ds.glob("*.idx") for key, _, _ in image_spans(p)}


def _params():
    marks = {"dali-cpu": [pytest.mark.dali]}
    return [
        pytest.param(backend, fault, marks=marks.get(backend, []), id=f"{backend}-{fault}")
        for fault in FAULTS
        for backend in BACKENDS
    ]


def _message(exc: BaseException, root: Path) -> str:
    return str(exc).replace(str(root), "<dataset>")


@pytest.mark.parametrize(("backend", "fault"), _params())
def test_backend_survives_or_names_the_file(clean_ds, tmp_path, backend, fault, figures, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline")
    root, damaged = _damaged_copy(clean_ds, tmp_path, fault)
    cfg = LoaderConfig(data=str(root), batch_size=BATCH, image_size=32, recipe="small", seed=3,
                       shuffle_buffer=16, retries=1, retry_backoff_s=0, **BACKENDS[backend])  # fmt: skip
    loader = build_loader(cfg, World())
    batches, error = [], None
    try:
        for batch in loader:
            batches.append(batch)
    except ShardReadError as exc:
        error = exc
    finally:
        loader.close()
    report = loader.epoch_report()
    completed = error is None and len(batches) == STEPS
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    figures(
        "read",
        fault,
        backend=backend,
        samples_damaged=len(damaged),
        skipped_and_replaced=len(report.corrupt),
        batches_before_error="-" if error is None else len(batches),
        epoch_completed="yes" if completed else "no",
        message=_message(error, root) if error else (warned[0] if warned else "(no log line)"),
    )

    if FAULTS[fault][1] == "replace":
        assert completed, error
        assert set(report.corrupt) <= damaged  # only damaged samples are ever skipped
        delivered = set(report.keys)
        assert not delivered & set(report.corrupt)
        assert delivered | set(report.corrupt) == _all_keys(clean_ds)  # nothing else lost
        assert all(torch.isfinite(b.images).all() for b in batches)
        assert all(len(b) == BATCH for b in batches)
        for key in report.corrupt:  # each skip is also said in the log, naming the sample
            assert any(key in line for line in warned), (key, warned)
        if fault.startswith("image headers"):
            assert set(report.corrupt) == damaged  # every backend detects these
    else:
        assert error is not None and not completed
        text = str(error)
        assert "\n" not in text
        name, cause = CAUSES[fault]
        assert name in text and cause in text, text


@pytest.mark.parametrize("fault", list(FAULTS))
def test_shard_verify_flags_every_fault(clean_ds, tmp_path, fault, figures):
    """Also the damage that decoders accept: verify hashes every byte."""
    root, _ = _damaged_copy(clean_ds, tmp_path, fault)
    report = verify(str(root))
    figures(
        "read",
        fault,
        backend="shard verify",
        epoch_completed="-",
        message=" / ".join(p.replace(str(root), "<dataset>") for p in report.problems),
    )
    assert not report.ok
    assert all(p.startswith(DAMAGED) for p in report.problems), report.problems


def test_verify_is_clean_before_damage(clean_ds):
    assert verify(str(clean_ds)).ok
    assert len(tree_digest(clean_ds)) == 4 * 2 + 3  # shards, indexes, manifest, table, rejected


def test_trainer_names_a_truncated_shard_in_one_line(clean_ds, tmp_path, figures):
    """What a user of `python -m train` sees (the loader retries 3 times first)."""
    fault = "shard truncated to half"
    root, _ = _damaged_copy(clean_ds, tmp_path, fault)
    cmd = [sys.executable, "-m", "train", "--data", root, "--backend", "torch", "--num-workers",
           "0", "--out", tmp_path / "run", "--batch-size", "8", "--epochs", "1"]  # fmt: skip
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    line = one_line_error(proc.stderr, "train: error: ")
    figures(
        "read",
        fault,
        backend="python -m train (torch)",
        epoch_completed="no",
        message=f"exit {proc.returncode}: {line.replace(str(root), '<dataset>')}",
    )
    assert proc.returncode == 1
    assert f"{DAMAGED}.tar" in line and "truncated" in line
