"""The inputs of every suite: shared datasets extracted once, subsets, stand-ins, packed shards.

One work folder per run (``--work-dir``, else a temp dir removed afterwards;
``all`` shares one between its suites) holds::

    src-imagenet/             the 500-photo ImageNet sample + list*.csv (path,label)
    src-cifar/                CIFAR-10 extracted once (train/<class>/*.jpg, test/...)
    src-cifar-train-2000/     an even subset: only the first 200 files per class extracted
    src-<name>/               synthetic stand-ins (--quick without the shared data)
    packed-<name>-<n>/        `shard pack` output (n samples per shard)

Extraction and packing are skipped when their outputs are already there, so a
kept ``--work-dir`` makes repeated runs start fast. The shared datasets come
from ``SHARDFLOW_SHARED_DATA`` (default ``../shared/data`` next to the
repository); nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import shared_data

# CIFAR-10 train images every suite uses with --quick: one subset, extracted and packed once.
QUICK_CIFAR = 2000
# ImageNet photos the loader suites read with --quick (shard-write packs all 500).
QUICK_IMAGENET = 200
IMAGENET_ARCHIVE = "imagenet-sample-500.tar"
CIFAR_ARCHIVE = "cifar10-jpeg.tar.gz"


@dataclass(frozen=True, kw_only=True)
class Source:
    """Images to pack: SRC is what ``shard pack`` takes (a class-folder tree or a
    path,label CSV); FILES and LABELS list the images in pack order."""

    name: str
    src: str
    files: list[Path]
    labels: list[str]
    synthetic: bool = False

    @property
    def mb(self) -> float:
        return sum(p.stat().st_size for p in self.files) / 1e6


def add_work_dir_argument(parser) -> None:
    """The one --work-dir flag every suite that needs data takes."""
    parser.add_argument(
        "--work-dir",
        default=None,
        help="scratch folder for extracted and packed data, kept and reused between runs "
        "(default: a temp dir, removed afterwards)",
    )


@contextlib.contextmanager
def work_dir(path: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """PATH (created, kept), or a fresh temp dir that is removed on exit."""
    if path:
        work = Path(path)
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"shardflow-{prefix}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_once(archive: Path, dest: Path) -> Path:
    done = dest / ".extracted"
    if not done.exists():
        shutil.rmtree(dest, ignore_errors=True)
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
        done.touch()
    return dest


def imagenet_sample(work: Path, *, limit: int | None = None, copies: int = 1) -> Source | None:
    """The ImageNet sample as a path,label CSV (label = the synset in the file name):
    its first LIMIT photos, each listed COPIES times. None if the archive is missing."""
    archive = shared_data() / IMAGENET_ARCHIVE
    if not archive.exists():
        return None
    root = _extract_once(archive, work / "src-imagenet")
    files = sorted(root.rglob("*.JPEG"))[:limit] * copies
    labels = [p.name.split("_", 1)[0] for p in files]
    suffix = "" if (limit, copies) == (None, 1) else f"-{limit or 'all'}x{copies}"
    table = root / f"list{suffix}.csv"
    if not table.exists():
        tmp = table.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([str(p), label] for p, label in zip(files, labels, strict=True))
        tmp.replace(table)
    name = "imagenet" + suffix
    return Source(name=name, src=str(table), files=files, labels=labels)


def cifar10(work: Path, *, split: str = "train", limit: int | None = None) -> Source | None:
    """CIFAR-10 SPLIT as a class-folder tree; with LIMIT an even subset (the first
    LIMIT/10 files of every class, in name order). None if the archive is missing."""
    archive = shared_data() / CIFAR_ARCHIVE
    if not archive.exists():
        return None
    if limit:
        # Only the subset is written: creating all 60,000 files costs more than the
        # suites that use a subset spend measuring.
        root = work / f"src-cifar-{split}-{limit}"
        done = root / ".extracted"
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            with tarfile.open(archive) as tf:
                tf.extractall(root, members=_even_subset(tf, split, limit), filter="data")
            done.touch()
    else:
        root = _extract_once(archive, work / "src-cifar")
    top = next((p for p in [root, *root.iterdir()] if (p / split).is_dir()), None)
    if top is None:
        raise SystemExit(f"{archive} has no {split}/ folder")
    return _folder_source(f"cifar-{split}-{limit or 'all'}", top / split)


def _even_subset(tf: tarfile.TarFile, split: str, limit: int) -> list[tarfile.TarInfo]:
    """The first LIMIT/10 files of every class folder of SPLIT, in archive order."""
    per_class: dict[str, list[tarfile.TarInfo]] = {}
    for m in tf.getmembers():
        parts = m.name.split("/")
        if m.isfile() and len(parts) >= 3 and parts[-3] == split:
            per_class.setdefault(parts[-2], []).append(m)
    keep = max(1, limit // 10)
    chosen = {id(m) for ms in per_class.values() for m in sorted(ms, key=lambda m: m.name)[:keep]}
    return [m for m in tf.getmembers() if id(m) in chosen]


def synthetic(work: Path, name: str, *, per_class: int, size: int) -> Source:
    """10 classes x PER_CLASS generated JPEGs of SIZE px (a stand-in for missing data)."""
    from shard_tools.synth import make_image_folder

    root = work / f"src-{name}"
    done = root / ".generated"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        make_image_folder(root, num_classes=10, per_class=per_class, size=size)
        done.touch()
    return _folder_source(name, root, synthetic=True)


def _folder_source(name: str, root: Path, *, synthetic: bool = False) -> Source:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return Source(
        name=name,
        src=str(root),
        files=files,
        labels=[p.parent.name for p in files],
        synthetic=synthetic,
    )


def pack_once(
    source: Source,
    work: Path,
    *,
    max_count: int,
    workers: int,
    shuffle: bool = False,
    seed: int = 0,
    validate: bool = True,
) -> str:
    """SOURCE packed with ``shard pack`` into WORK (reused if its manifest is there)."""
    from shard_tools.config import PackConfig
    from shard_tools.pack import pack

    dest = work / f"packed-{source.name}-{max_count}{'-shuffled' if shuffle else ''}"
    if not (dest / "manifest.json").exists():
        shutil.rmtree(dest, ignore_errors=True)
        cfg = PackConfig(src=source.src, dest=str(dest), max_count=max_count, workers=workers,
                         shuffle=shuffle, seed=seed, validate=validate)  # fmt: skip
        pack(cfg, progress=False)
    return str(dest)


def loader_datasets(
    work: Path,
    *,
    quick: bool,
    only: str | None,
    cifar_limit: int | None,
    epochs: int | None,
    workers: int,
) -> list[dict]:
    """The packed datasets the loader suites (pipeline, e2e) read: the ImageNet sample
    at 224 px (100 per shard; its first 200 photos with QUICK) and CIFAR-10 train at
    32 px (5,000 per shard). With QUICK and no shared data, synthetic images of the
    same sizes stand in."""
    out = []
    wanted = set(only.split(",")) if only else {"imagenet", "cifar"}
    if "imagenet" in wanted:
        src = imagenet_sample(work, limit=QUICK_IMAGENET if quick else None)
        if src is None and quick:
            src = synthetic(work, "photo-like", per_class=50, size=400)
        if src is None:
            raise SystemExit(f"{IMAGENET_ARCHIVE} not found (set SHARDFLOW_SHARED_DATA or use --quick)")  # fmt: skip
        out.append(dict(name="imagenet", root=pack_once(src, work, max_count=100, workers=workers),
                        batch=64, image_size=224, recipe="imagenet",
                        epochs=epochs or (1 if quick else 4)))  # fmt: skip
    if "cifar" in wanted:
        src = cifar10(work, limit=cifar_limit)
        if src is None and quick:
            src = synthetic(work, "cifar-like", per_class=500, size=32)
        if src is None:
            raise SystemExit(f"{CIFAR_ARCHIVE} not found (set SHARDFLOW_SHARED_DATA or use --quick)")  # fmt: skip
        out.append(dict(name="cifar", root=pack_once(src, work, max_count=5000, workers=workers),
                        batch=256, image_size=32, recipe="small", epochs=epochs or 1))  # fmt: skip
    return out
