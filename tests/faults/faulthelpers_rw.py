"""Helpers of the write, read, killed-process and security fault cases.

Plain functions (no fixtures): running the real ``shard`` and ``train`` entry
points in child processes, digests of output trees, byte-level damage to
shards, and the inputs of the bad-image cases.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.shard_tools.shardtest_helpers import read_rejected, tree_digest  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: unbuffered, one thread per library."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


def run_shard(
    args: list, *, prefix: tuple[str, ...] = (), timeout: float = 180, **kw
) -> subprocess.CompletedProcess:
    """``shard ARGS`` (the real CLI) in a child process, behind PREFIX; text output captured."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "shard_tools.cli", *map(str, args)],
        cwd=REPO,
        env=kw.pop("env", None) or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def one_line_error(stderr: str, prefix: str) -> str:
    """The single error line of STDERR (asserts: no traceback, starts with PREFIX)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(prefix), stderr
    return lines[-1]


# -- inputs of the bad-image cases ------------------------------------------------


def _noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return rgb.convert(mode)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, mode: str = "RGB", size: tuple[int, int] = (24, 16)) -> bytes:
    return encode(_noise(mode, size, seed), "JPEG", quality=90)


def png(seed: int, mode: str = "RGB", size: tuple[int, int] = (24, 16)) -> bytes:
    img = _noise("L", size, seed).convert("I;16") if mode == "I;16" else _noise(mode, size, seed)
    return encode(img, "PNG")


def jpeg_with_size(seed: int, width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) claims WIDTH x HEIGHT pixels."""
    data = bytearray(jpeg(seed))
    pos = 2
    while data[pos + 1] != 0xC0:  # walk the marker segments up to the frame header
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def random_bytes(seed: int, n: int = 3000) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# -- damage to a packed dataset ------------------------------------------------------


def image_spans(idx_path: Path) -> list[tuple[str, int, int]]:
    """(key, offset, size) of the image member of every sample listed in a DALI .idx."""
    from shard_tools.format import parse_index

    index = parse_index(idx_path.read_text(), source=idx_path.name)
    return [
        (key, int(off), int(size))
        for key, (off, size) in zip(index.keys, index.image.tolist(), strict=True)
    ]


def flip_bytes(tar: Path, spans: list[tuple[int, int]], flips: int, seed: int) -> None:
    """XOR FLIPS bytes at seeded random positions inside each (offset, size) span of TAR."""
    data = bytearray(tar.read_bytes())
    rng = np.random.default_rng(seed)
    for offset, size in spans:
        for pos in rng.choice(size, size=min(flips, size), replace=False).tolist():
            data[offset + pos] ^= 0xFF
    tar.write_bytes(bytes(data))
