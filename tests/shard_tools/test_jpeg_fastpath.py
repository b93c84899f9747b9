"""Validation through libjpeg-turbo packs exactly what validation through PIL packs."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shard_tools import validate

pytest.importorskip("simplejpeg")


def _jpeg(mode: str, size=(48, 40), **save) -> bytes:
    # A gradient, so that truncation and flipped bytes hit entropy-coded data.
    width, height = size
    bands = len(mode)
    raw = bytes(
        (x * 7 + y * 3 + b * 50) % 256
        for y in range(height)
        for x in range(width)
        for b in range(bands)
    )
    img = Image.frombytes(mode, size, raw)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def _cases() -> dict[str, bytes]:
    rgb = _jpeg("RGB")
    return {
        "rgb": rgb,
        "gray": _jpeg("L"),
        "cmyk": _jpeg("CMYK"),
        "progressive": _jpeg("RGB", progressive=True),
        "subsampling-444": _jpeg("RGB", subsampling=0),
        "odd-size": _jpeg("RGB", size=(1, 1)),
        "truncated-half": rgb[: len(rgb) // 2],
        "truncated-header": rgb[:60],
        "no-eoi": rgb[:-2],
        "garbage-after-soi": b"\xff\xd8\xff" + bytes(range(256)) * 4,
        "flipped-scan-byte": rgb[:-40] + bytes([rgb[-40] ^ 0xFF]) + rgb[-39:],
        "big-header": _jpeg("RGB", size=(300, 200)),
    }


def _outcome(data: bytes, opts: validate.WorkerOptions):
    try:
        return validate.image_member(data, opts)
    except validate.Rejected as exc:
        return ("rejected", str(exc))


@pytest.mark.parametrize("check", [True, False], ids=["validate", "no-validate"])
@pytest.mark.parametrize("name", sorted(_cases()))
def test_same_verdict_as_pil(name, check, monkeypatch):
    data = _cases()[name]
    opts = validate.WorkerOptions(class_names=("a",), validate=check, max_pixels=50_000)
    previous = validate.configure_pil()
    try:
        fast = _outcome(data, opts)
        monkeypatch.setattr(validate, "simplejpeg", None)
        pil = _outcome(data, opts)
    finally:
        validate.restore_pil(previous)
    assert fast == pil


def test_fast_path_is_taken_for_kept_jpegs(monkeypatch):
    # The PIL path is not reached for a plain JPEG that is kept as it is.
    def no_pil(*args, **kwargs):
        raise AssertionError("PIL was asked")

    monkeypatch.setattr(validate, "open_header", no_pil)
    opts = validate.WorkerOptions(class_names=("a",))
    data = _cases()["gray"]
    assert validate.image_member(data, opts) == ("jpg", data, 48, 40)
