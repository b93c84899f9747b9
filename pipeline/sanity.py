"""Cheap checks on encoded image bytes, run before any decoder sees them.

A DALI pipeline cannot skip one bad sample once a batch is inside it, and a
PIL error in a worker kills a plain DataLoader epoch. So every sample's bytes
are checked here first (microseconds, no pixel decode): the container's magic
number, the structure up to the pixel data, and the end marker. What passes is
well-formed in its structure; what fails is replaced by a valid sample of the
same batch and reported by key. Damage these checks cannot see (say, a frame
that names an undefined quantisation table) is caught by the decoders: the
torch backend per image, the DALI backends by re-checking the batches in
flight with a full decode after a pipeline error (see dali_backend).
"""

from __future__ import annotations

import struct

import numpy as np

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def _huffman_ok(data: bytes, pos: int, end: int) -> bool:
    # Each table: class/id byte, 16 code-length counts, then that many symbols.
    while pos < end:
        if data[pos] >> 4 > 1 or data[pos] & 0x0F > 3:
            return False
        count = sum(data[pos + 1 : pos + 17])
        if count > 256 or pos + 17 + count > end:
            return False
        pos += 17 + count
    return True


Dims = tuple[int, int]


def _check_jpeg(data: bytes) -> tuple[str | None, Dims]:
    n = len(data)
    # EOI within the last bytes: a truncated file almost never ends in FFD9 by chance.
    if b"\xff\xd9" not in bytes(data[max(0, n - 64) :]):
        return "JPEG has no end-of-image marker (truncated?)", (0, 0)
    pos = 2
    seen_sof = False
    dims = (0, 0)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return f"JPEG marker expected at byte {pos}", (0, 0)
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > n:
            return f"JPEG segment 0x{marker:02X} at byte {pos} overruns the file", (0, 0)
        if marker in _JPEG_SOF:
            if length < 8:
                return "JPEG frame header too short", (0, 0)
            height, width = struct.unpack_from(">HH", data, pos + 5)
            if height == 0 or width == 0:
                return f"JPEG frame has zero size ({width}x{height})", (0, 0)
            seen_sof = True
            dims = (width, height)
        elif marker == 0xC4 and not _huffman_ok(data, pos + 4, pos + 2 + length):
            return f"JPEG Huffman table at byte {pos} is malformed", (0, 0)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            if not seen_sof:
                return "JPEG scan before any frame header", (0, 0)
            if pos + 2 + length >= n - 2:
                return "JPEG has no scan data", (0, 0)
            return None, dims
        elif marker == 0xD9:
            return "JPEG ends before its first scan", (0, 0)
        pos += 2 + length
    return "JPEG ends inside its headers", (0, 0)


def _check_png(data: bytes) -> tuple[str | None, Dims]:
    if len(data) < 8 + 25 + 12:
        return "PNG too short", (0, 0)
    length, ctype = struct.unpack_from(">I4s", data, 8)
    if ctype != b"IHDR" or length != 13:
        return "PNG does not start with an IHDR chunk", (0, 0)
    width, height = struct.unpack_from(">II", data, 16)
    if width == 0 or height == 0:
        return f"PNG has zero size ({width}x{height})", (0, 0)
    if b"IEND" not in bytes(data[len(data) - 16 :]):
        return "PNG has no IEND chunk (truncated?)", (0, 0)
    return None, (width, height)


def _check_webp(data: bytes) -> tuple[str | None, Dims]:
    if len(data) < 20 or data[8:12] != b"WEBP":
        return "RIFF file is not WebP", (0, 0)
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size + 8 > len(data):
        return f"WebP declares {riff_size + 8} bytes but has {len(data)} (truncated?)", (0, 0)
    if len(data) < 30:
        return "WebP too short for its frame header", (0, 0)
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        w, h = struct.unpack_from("<HH", data, 26)
        dims = (w & 0x3FFF, h & 0x3FFF)
    elif chunk == b"VP8L":  # lossless: 14-bit width-1 and height-1 after the signature byte
        bits = int.from_bytes(data[21:25], "little")
        dims = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    elif chunk == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
        dims = (
            int.from_bytes(data[24:27], "little") + 1,
            int.from_bytes(data[27:30], "little") + 1,
        )
    else:
        return "WebP has an unknown first chunk", (0, 0)
    if 0 in dims:
        return "WebP has zero size", (0, 0)
    return None, dims


def inspect_image(data: bytes | bytearray | memoryview) -> tuple[str | None, Dims]:
    """(None, (width, height)) if DATA looks like a complete JPEG/PNG/WebP, else
    (the reason it does not, (0, 0))."""
    # A memoryview (of a read's buffer) is checked in place: the checks index, unpack and
    # slice it as they would bytes, and copy only the few tail bytes they search.
    if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
        data = data.cast("B")
    if len(data) < 4:
        return f"image has only {len(data)} bytes", (0, 0)
    if data[:3] == b"\xff\xd8\xff":
        return _check_jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _check_png(data)
    if data[:4] == b"RIFF":
        return _check_webp(data)
    return "not a JPEG, PNG or WebP image (unknown magic number)", (0, 0)


def check_image(data: bytes | bytearray | memoryview) -> str | None:
    """None if DATA looks like a complete JPEG/PNG/WebP, else the reason it does not."""
    return inspect_image(data)[0]


# -- many images at once ---------------------------------------------------------------
# The checks above walk a JPEG's markers in Python: ~10 us an image, as much as the rest
# of reading it. inspect_many walks the markers of every JPEG of a read at once (numpy,
# one step of every walk per iteration), so a read of 5,000 images costs a few dozen
# array operations per marker instead of 5,000 Python loops. Only its "valid" verdict is
# trusted: whatever it does not accept is checked again, one by one, by inspect_image,
# which gives the reason (or, if the bulk walk gave up early, accepts it after all).
_MAX_MARKERS = 64  # a walk still going after this many segments is left to inspect_image
# Below this many images a read is better checked one by one (by the caller, on the copies
# it makes anyway): the walk's fixed cost, a few dozen array operations per marker, is
# then more than the Python loops it saves (2 cores: break-even at ~250 images).
BULK_FROM = 256
_SOF_TABLE = np.zeros(256, dtype=bool)
_SOF_TABLE[list(_JPEG_SOF)] = True
_STANDALONE_TABLE = np.zeros(256, dtype=bool)
_STANDALONE_TABLE[list(_JPEG_STANDALONE)] = True


def _at(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    # Clipped: a field read past the image (a segment too short for it) is never used.
    return data[np.minimum(idx, len(data) - 1)].astype(np.int64)


def _huffman_all_ok(data, lo: np.ndarray, end: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """_huffman_ok for many segments: tables from LO to END (absolute positions), bytes
    of each image ending at STOP."""
    ok = np.ones(len(lo), dtype=bool)
    pos = lo.copy()
    live = pos < end
    span = np.arange(1, 17)
    while live.any():
        i = np.flatnonzero(live)
        p = pos[i]
        head = _at(data, p)
        ok[i[(head >> 4 > 1) | (head & 0x0F > 3)]] = False
        cols = p[:, None] + span  # the 16 code-length counts (fewer where the image ends)
        inside = cols < stop[i, None]
        count = np.where(inside, data[np.minimum(cols, stop[i, None] - 1)], 0).sum(axis=1)
        ok[i[(count > 256) | (p + 17 + count > end[i])]] = False
        pos[i] = p + 17 + count
        live = ok & (pos < end)
    return ok


def _jpeg_walks(data: np.ndarray, start: np.ndarray, n: np.ndarray):
    """(valid, width, height) of the JPEGs at START (absolute) of N bytes each, by the
    rules of _check_jpeg; 'not valid' may also mean 'not decided here'."""
    m = len(start)
    valid = np.zeros(m, dtype=bool)
    width = np.zeros(m, dtype=np.int64)
    height = np.zeros(m, dtype=np.int64)
    # End of image within the last 64 bytes (the positions rfind would search).
    tail = np.arange(-64, -1)
    k = np.maximum(start[:, None] + n[:, None] + tail, start[:, None])
    eoi = ((data[k] == 0xFF) & (data[k + 1] == 0xD9)).any(axis=1)
    seen_sof = np.zeros(m, dtype=bool)
    pos = np.full(m, 2, dtype=np.int64)
    live = np.flatnonzero(eoi)
    for _ in range(_MAX_MARKERS):
        live = live[pos[live] + 4 <= n[live]]  # else: it ends inside its headers
        if len(live) == 0:
            break
        at = start[live] + pos[live]
        marked = data[at] == 0xFF  # else: no marker where one must be
        live, at = live[marked], at[marked]
        marker = data[at + 1]
        fill = marker == 0xFF
        pos[live[fill]] += 1
        alone = _STANDALONE_TABLE[marker]
        pos[live[alone]] += 2
        seg = ~fill & ~alone
        keep = live[fill | alone]
        live, at, marker = live[seg], at[seg], marker[seg]
        length = (_at(data, at + 2) << 8) | _at(data, at + 3)
        fits = (length >= 2) & (pos[live] + 2 + length <= n[live])
        live, at, marker, length = live[fits], at[fits], marker[fits], length[fits]
        drop = np.zeros(len(live), dtype=bool)
        q = np.flatnonzero(_SOF_TABLE[marker])
        if len(q):
            s, a = live[q], at[q]
            h = (_at(data, a + 5) << 8) | _at(data, a + 6)
            w = (_at(data, a + 7) << 8) | _at(data, a + 8)
            good = (length[q] >= 8) & (h > 0) & (w > 0)
            height[s[good]], width[s[good]] = h[good], w[good]
            seen_sof[s[good]] = True
            drop[q[~good]] = True
        dht = marker == 0xC4
        if dht.any():
            d = np.flatnonzero(dht)
            ok = _huffman_all_ok(
                data, at[d] + 4, at[d] + 2 + length[d], start[live[d]] + n[live[d]]
            )
            drop[d[~ok]] = True
        sos = marker == 0xDA
        if sos.any():
            q = np.flatnonzero(sos)
            s = live[q]
            fine = seen_sof[s] & (pos[s] + 2 + length[q] < n[s] - 2)
            valid[s[fine]] = True
            drop[q] = True  # decided: valid, or left to inspect_image for its reason
        drop |= marker == 0xD9
        go = ~drop
        pos[live[go]] += 2 + length[go]
        live = np.concatenate([keep, live[go]])
    return valid, width, height


def inspect_many(buf, starts: np.ndarray, sizes: np.ndarray, bulk: bool | None = None
                 ) -> tuple[dict[int, str], np.ndarray, np.ndarray]:  # fmt: skip
    """inspect_image of each image BUF[STARTS[i] : STARTS[i] + SIZES[i]]: (the reason of
    each one that fails, by its position; width and height of each, int32, 0 where it
    fails). The JPEGs are walked at once (see the note above) if BULK, by default from
    BULK_FROM images on."""
    starts = np.asarray(starts, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    m = len(starts)
    if bulk is None:
        bulk = m >= BULK_FROM
    width = np.zeros(m, dtype=np.int32)
    height = np.zeros(m, dtype=np.int32)
    problems: dict[int, str] = {}
    undecided = np.ones(m, dtype=bool)
    if bulk and m:
        data = np.frombuffer(buf, dtype=np.uint8)
        jpeg = (sizes >= 4) & (starts + sizes <= len(data))
        s = np.where(jpeg, starts, 0)
        jpeg &= (data[s] == 0xFF) & (data[s + 1] == 0xD8) & (data[s + 2] == 0xFF)
        j = np.flatnonzero(jpeg)
        if len(j):
            valid, w, h = _jpeg_walks(data, starts[j], sizes[j])
            ok = j[valid]
            width[ok], height[ok] = w[valid], h[valid]
            undecided[ok] = False
    if undecided.any():
        view = memoryview(buf).cast("B")
        for i in np.flatnonzero(undecided).tolist():
            a = int(starts[i])
            why, (w, h) = inspect_image(view[a : a + int(sizes[i])])
            if why is None:
                width[i], height[i] = w, h
            else:
                problems[i] = why
    return problems, width, height
