"""The pack configuration: one frozen value that validates itself.

argv is parsed into it in ``cli.py`` only; the Python API builds it directly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from shard_tools.format import check_url, redact

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
FORMATS = ("keep", "jpeg", "webp")
EXECUTORS = ("local", "ray")
# --executor ray, default chunk: at least this many inputs per Ray task, long
# enough (a minute or so of decoding) that scheduling costs nothing visible.
RAY_CHUNK_MIN = 10_000


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``1000``, ``256MB`` (10^6), ``1GiB`` (2^30), ``64K`` (2^10)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 1000, 256MB, 1GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass(frozen=True, kw_only=True)
class PackConfig:
    """Everything that decides what ``shard pack`` writes (and a few how-to knobs).

    ``workers``, ``resume`` and ``ray_address`` change how the work is done,
    never the bytes written; every other field is recorded in the manifest's
    ``options``. ``executor="ray"`` packs chunks of ``chunk_size`` inputs
    independently, so each chunk ends its last shard early: its shard
    boundaries depend on the chunk size, which is then recorded too.
    """

    src: str | tuple[str, ...]  # folder, manifest file, or tar pattern(s)
    dest: str
    max_count: int = 10_000  # samples per shard
    max_bytes: int = 256 * 10**6  # bytes per shard file (tar headers and padding included)
    shuffle: bool = False
    seed: int = 0
    workers: int = 0  # 0: one per CPU; 1: in the main process
    resize_max_side: int | None = None
    quality: int = 95
    image_format: str = "keep"
    validate: bool = True
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb threshold
    strict: bool = False
    resume: bool = False
    classes: tuple[str, ...] | None = None  # keep only these class names
    fraction: float | None = None  # keep this fraction of every class (seeded)
    executor: str = "local"
    ray_address: str | None = None
    ray_chunk_size: int = 0  # inputs per Ray task; 0: see chunk_size
    # Labels (shard_tools.labels.LabelSpec): "" = the default for the source, "cls",
    # "json:FIELD.PATH", or a column name for a CSV/JSONL/Parquet SRC.
    label: str = ""
    classes_from: str | None = None  # class names in label order (a file)
    unlabelled: bool = False  # no labels at all (image-text, self-supervised): label -1
    # A pack that keeps nothing, or rejects more than this fraction of its inputs, fails.
    max_reject_fraction: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.src, list):
            object.__setattr__(self, "src", tuple(self.src))
        if not self.src:
            raise ValueError("src: give a folder, a manifest file or tar files")
        if not self.dest:
            raise ValueError("dest: give a folder or URL")
        for url in (*(self.src if isinstance(self.src, tuple) else (self.src,)), self.dest):
            check_url(url, "SRC" if url != self.dest else "DEST")
        if self.max_count < 1:
            raise ValueError(f"--max-count must be >= 1, got {self.max_count}")
        if self.max_bytes < 10240 + 2048:
            raise ValueError(f"--max-bytes must be at least 12288 bytes, got {self.max_bytes}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.resize_max_side is not None and self.resize_max_side < 1:
            raise ValueError(f"--resize-max-side must be >= 1 pixel, got {self.resize_max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be within 1..100, got {self.quality}")
        if self.image_format not in FORMATS:
            raise ValueError(
                f"--format must be one of {', '.join(FORMATS)}, got {self.image_format!r}"
            )
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be within (0, 1], got {self.fraction}")
        if self.classes is not None:
            if isinstance(self.classes, list | str):
                names = self.classes.split(",") if isinstance(self.classes, str) else self.classes
                object.__setattr__(self, "classes", tuple(names))
            if not self.classes or any(not c for c in self.classes):
                raise ValueError("--classes: give comma-separated class names")
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(
                f"--max-reject-fraction must be within [0, 1], got {self.max_reject_fraction}"
            )
        if self.unlabelled and (self.label or self.classes_from):
            raise ValueError("--unlabelled takes neither --label nor --classes-from")
        if self.ray_chunk_size < 0:
            raise ValueError(f"--ray-chunk-size must be >= 0, got {self.ray_chunk_size}")
        if self.executor != "ray" and (self.ray_address or self.ray_chunk_size):
            raise ValueError("--ray-address and --ray-chunk-size need --executor ray")
        if not self.validate and (self.resize_max_side or self.image_format != "keep"):
            raise ValueError(
                "--no-validate cannot be combined with re-encoding (--resize-max-side, --format)"
            )

    @property
    def num_workers(self) -> int:
        return self.workers or default_workers()

    @property
    def chunk_size(self) -> int:
        """Inputs per Ray task: ``ray_chunk_size``, or the smallest multiple of
        ``max_count`` that is at least RAY_CHUNK_MIN (a whole number of full
        shards, so chunks add no short shards when ``max_count`` decides)."""
        return self.ray_chunk_size or self.max_count * -(-RAY_CHUNK_MIN // self.max_count)

    def recorded_options(self) -> dict[str, Any]:
        """The options that determine the output bytes (written into the manifest)."""
        # Credentials in an http(s) SRC are used to read, never recorded.
        src = [redact(s) for s in self.src] if isinstance(self.src, tuple) else redact(self.src)
        ray = (
            {"executor": "ray", "ray_chunk_size": self.chunk_size} if self.executor == "ray" else {}
        )
        return {
            "src": src,
            "max_count": self.max_count,
            "max_bytes": self.max_bytes,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "resize_max_side": self.resize_max_side,
            "quality": self.quality,
            "format": self.image_format,
            "validate": self.validate,
            "max_pixels": self.max_pixels,
            "classes": list(self.classes) if self.classes else None,
            "fraction": self.fraction,
            "label": self.label or None,
            "classes_from": redact(self.classes_from) if self.classes_from else None,
            "unlabelled": self.unlabelled,
            **ray,
        }
