"""The bulk image check (sanity.inspect_many) agrees with the one-by-one check on
every image: valid JPEGs of many encoders' shapes and thousands of damaged ones."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from pipeline import sanity
from pipeline.sanity import inspect_image, inspect_many


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    # smooth gradients plus noise: entropy-coded data of a realistic size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encodings(rng: np.random.Generator) -> list[bytes]:
    """JPEGs as different writers lay them out: baseline, progressive, optimised tables,
    restart markers, EXIF and comments, grayscale, CMYK, 4:4:4 and 4:2:0, odd sizes."""
    out = []
    for w, h in ((1, 1), (7, 5), (32, 32), (97, 61), (300, 200)):
        img = _photo(rng, w, h)
        for kw in ({}, {"progressive": True}, {"optimize": True}, {"subsampling": 0},
                   {"quality": 5}, {"quality": 100, "subsampling": 2},
                   {"exif": b"Exif\x00\x00" + bytes(200), "comment": b"made by a test"}):  # fmt: skip
            buf = io.BytesIO()
            img.save(buf, "JPEG", **kw)
            out.append(buf.getvalue())
        for mode in ("L", "CMYK"):
            buf = io.BytesIO()
            img.convert(mode).save(buf, "JPEG")
            out.append(buf.getvalue())
    # restart intervals (DRI) and fill bytes before a marker, as some cameras write them
    buf = io.BytesIO()
    _photo(rng, 64, 48).save(buf, "JPEG", restart_marker_blocks=2)
    out.append(buf.getvalue())
    data = out[3]
    out.append(data[:2] + b"\xff\xff\xff" + data[2:])
    return out


def _damaged(rng: random.Random, data: bytes) -> bytes:
    """DATA with one kind of damage, mostly within its headers (where the check looks)."""
    head = max(4, min(len(data), 700))
    kind = rng.randrange(6)
    b = bytearray(data)
    if kind == 0:  # bytes flipped
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(head)] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a byte set to a marker-like value
        b[rng.randrange(head)] = rng.choice([0x00, 0xFF, 0xD9, 0xDA, 0xC4, 0xC0, 0xD0, 0x01])
    elif kind == 2:  # truncated
        b = b[: rng.randrange(len(b))]
    elif kind == 3:  # garbage inserted
        at = rng.randrange(head)
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
    elif kind == 4:  # bytes removed from the headers
        at = rng.randrange(head)
        del b[at : at + rng.randint(1, 30)]
    else:  # a segment length rewritten
        at = rng.randrange(2, head - 1)
        b[at], b[at + 1] = rng.randrange(256), rng.randrange(256)
    return bytes(b)


def _bulk(images: list[bytes]):
    """inspect_many over IMAGES laid out in one buffer with gaps between them, as in a
    tar read, as inspect_image's (problem, (width, height)) per image."""
    buf, starts = bytearray(b"\x00" * 37), []
    for data in images:
        starts.append(len(buf))
        buf += data + b"\xaa" * 19
    problems, width, height = inspect_many(bytes(buf), np.array(starts),
                                           np.array([len(d) for d in images]), bulk=True)  # fmt: skip
    return [(problems.get(i), (w, h))
            for i, (w, h) in enumerate(zip(width.tolist(), height.tolist(), strict=True))]  # fmt: skip


def test_bulk_check_accepts_what_the_single_check_accepts(monkeypatch):
    images = _encodings(np.random.default_rng(0))
    want = [inspect_image(d) for d in images]
    assert all(problem is None for problem, _ in want)

    def one_by_one(data):
        raise AssertionError("a valid JPEG was left to the one-by-one check")

    monkeypatch.setattr(sanity, "inspect_image", one_by_one)
    assert _bulk(images) == want


def test_bulk_check_agrees_on_damaged_images():
    rng = random.Random(0)
    good = _encodings(np.random.default_rng(1))
    images = [_damaged(rng, rng.choice(good)) for _ in range(3000)]
    images += [b"", b"\xff\xd8\xff", b"GIF89a" + bytes(40)]
    want = [inspect_image(d) for d in images]
    got = _bulk(images)
    assert sum(p is not None for p, _ in want) > 1000  # the damage is mostly seen
    for data, w, g in zip(images, want, got, strict=True):
        assert g == w, data[:64]


def test_bulk_check_of_png_and_webp_and_jpeg_mixed():
    images = []
    for fmt in ("PNG", "WEBP", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (21, 13), (5, 6, 7)).save(buf, fmt)
        images += [buf.getvalue(), buf.getvalue()[:-9]]
    assert _bulk(images) == [inspect_image(d) for d in images]
