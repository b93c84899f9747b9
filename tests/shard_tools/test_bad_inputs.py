"""Bad inputs are rejected with a reason, valid odd ones (gray, CMYK, PNG, WebP) are packed."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from shardtest_helpers import read_rejected

from shard_tools.cli import main
from shard_tools.config import PackConfig
from shard_tools.format import MANIFEST_NAME, read_manifest
from shard_tools.pack import pack


def _img(mode: str, size=(12, 9), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return rgb.convert(mode)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims WIDTHxHEIGHT pixels (the data is one tiny IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


GOOD = {
    "good/rgb.jpg": lambda: _save(_img("RGB"), "JPEG"),
    "good/gray.jpg": lambda: _save(_img("L"), "JPEG"),
    "good/cmyk.jpg": lambda: _save(_img("CMYK"), "JPEG"),
    "good/rgb.png": lambda: _save(_img("RGB"), "PNG"),
    "good/rgba.png": lambda: _save(_img("RGBA"), "PNG"),
    "good/palette.png": lambda: _save(_img("P"), "PNG"),
    "good/deep.png": lambda: _save(_img("L").convert("I;16"), "PNG"),
    "good/photo.webp": lambda: _save(_img("RGB"), "WEBP", quality=90),
    "good/UPPER.JPEG": lambda: _save(_img("RGB", seed=1), "JPEG"),
    "good/png_named.jpg": lambda: _save(_img("RGB", seed=2), "PNG"),
}
BAD = {
    "bad/truncated.jpg": (lambda: _save(_img("RGB", (64, 64)), "JPEG")[:400], "undecodable"),
    "bad/empty.jpg": (lambda: b"", "empty file"),
    "bad/random.jpg": (
        lambda: np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "not an image",
    ),
    "bad/notes.txt": (lambda: b"these are not pixels\n", "not an image"),
    "bad/bomb.png": (lambda: _png_bomb(20_000, 20_000), "decompression bomb"),
    "bad/anim.gif": (lambda: _save(_img("P"), "GIF"), "unsupported format GIF"),
    "bad/bitmap.bmp": (lambda: _save(_img("RGB"), "BMP"), "unsupported format BMP"),
}


@pytest.fixture
def mixed_src(tmp_path):
    src = tmp_path / "mixed"
    for rel, make in GOOD.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(make())
    for rel, (make, _) in BAD.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(make())
    (src / "stray.jpg").write_bytes(GOOD["good/rgb.jpg"]())
    return src


def test_exactly_the_bad_inputs_are_rejected(mixed_src, tmp_path):
    expected_bad = {rel: reason for rel, (_, reason) in BAD.items()}
    expected_bad["stray.jpg"] = "not inside a class folder"
    if os.geteuid() != 0:
        # Root reads any file regardless of its mode, so this case only runs unprivileged.
        locked = mixed_src / "bad" / "locked.jpg"
        locked.write_bytes(GOOD["good/rgb.jpg"]())
        locked.chmod(0)
        expected_bad["bad/locked.jpg"] = "permission denied"
    dest = tmp_path / "out"
    result = pack(PackConfig(src=str(mixed_src), dest=str(dest), workers=2), progress=False)
    rejected = read_rejected(dest)
    assert set(rejected) == set(expected_bad)
    for rel, reason in expected_bad.items():
        assert reason in rejected[rel], (rel, rejected[rel])
    assert result.rejected == len(expected_bad) == read_manifest(str(dest)).rejected

    m = read_manifest(str(dest))
    assert m.samples == len(GOOD)
    packed = {}
    for sample in wds.WebDataset([str(dest / s.name) for s in m.shards], shardshuffle=False):
        meta = json.loads(sample["json"])
        ext = next(k for k in sample if k in ("jpg", "png", "webp"))
        img = Image.open(io.BytesIO(sample[ext]))
        img.load()
        assert img.mode in ("L", "RGB"), meta["source"]
        assert (img.width, img.height) == (meta["width"], meta["height"])
        packed[meta["source"]] = (ext, sample[ext])
    assert set(packed) == set(GOOD)
    # Kept byte for byte: JPEG/PNG/WebP in L or RGB, with the extension of the real format.
    for rel in [
        "good/rgb.jpg",
        "good/gray.jpg",
        "good/rgb.png",
        "good/photo.webp",
        "good/UPPER.JPEG",
    ]:
        assert packed[rel][1] == (mixed_src / rel).read_bytes()
    assert packed["good/UPPER.JPEG"][0] == "jpg"
    assert packed["good/png_named.jpg"][0] == "png"
    # Converted to RGB: CMYK JPEG stays JPEG, other modes become lossless PNG.
    assert packed["good/cmyk.jpg"][0] == "jpg"
    for rel in ["good/rgba.png", "good/palette.png", "good/deep.png"]:
        assert packed[rel][0] == "png"
    rgba = np.asarray(Image.open(mixed_src / "good/rgba.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(packed["good/rgba.png"][1]))), rgba)


def test_strict_fails_without_manifest(mixed_src, tmp_path, capsys):
    dest = tmp_path / "strict"
    assert main(["pack", str(mixed_src), str(dest), "--strict", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("shard pack: error: --strict: rejected") and "\n" not in err
    assert not (dest / MANIFEST_NAME).exists()


def test_max_pixels_option(tmp_path):
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    (src / "big.png").write_bytes(_save(_img("RGB", (40, 30)), "PNG"))
    (src / "small.png").write_bytes(_save(_img("RGB", (10, 10)), "PNG"))
    dest = tmp_path / "out"
    result = pack(
        PackConfig(src=str(tmp_path / "src"), dest=str(dest), max_pixels=1000, workers=1),
        progress=False,
    )
    assert result.manifest.samples == 1
    assert "1200 pixels > --max-pixels 1000" in read_rejected(dest)["c/big.png"]
