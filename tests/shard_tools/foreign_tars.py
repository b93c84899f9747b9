"""Webdataset tars the way other tools write them, made in the tests (nothing downloaded).

- img2dataset: ``00000.tar`` ... with ``000000012.jpg``, ``.txt`` (the caption) and
  ``.json`` (url, caption, key, status, width, height, and here a ``label`` field);
- Hugging Face layout: ``train-00000-of-00002.tar`` with ``.jpg`` and ``.json``
  whose ``label`` is a class name;
- webdataset's ShardWriter: ``.jpg`` + ``.cls``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("cat", "dog", "fox")


def jpeg(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def caption(key: str) -> str:
    return f"a photo number {key} — ünïcode too"


def write_tar(path: Path, members: list[tuple[str, bytes]], *, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def img2dataset(root: Path, *, shards: int = 3, per_shard: int = 8, gz: bool = False) -> list[Path]:
    """img2dataset's output: per sample jpg, txt and json (with an integer label field)."""
    out = []
    n = 0
    for s in range(shards):
        members = []
        for _ in range(per_shard):
            key = f"{n:09d}"
            meta = {"url": f"https://example.com/{key}.jpg", "caption": caption(key), "key": key,
                    "status": "success", "width": 24, "height": 16, "label": n % 3}  # fmt: skip
            members += [(f"{key}.jpg", jpeg(n)), (f"{key}.txt", caption(key).encode()),
                        (f"{key}.json", json.dumps(meta).encode())]  # fmt: skip
            n += 1
        ext = ".tar.gz" if gz else ".tar"
        out.append(write_tar(root / f"{s:05d}{ext}", members, gz=gz))
    return out


def hf_layout(root: Path, *, shards: int = 2, per_shard: int = 9) -> list[Path]:
    """Hugging Face webdataset layout: jpg + json whose label is a class name."""
    out = []
    n = 0
    for s in range(shards):
        members = []
        for _ in range(per_shard):
            key = f"sample_{n:05d}"
            meta = {"label": CLASS_NAMES[n % 3], "source": "hf"}
            members += [(f"{key}.jpg", jpeg(100 + n)), (f"{key}.json", json.dumps(meta).encode())]
            n += 1
        out.append(write_tar(root / f"train-{s:05d}-of-{shards:05d}.tar", members))
    return out
