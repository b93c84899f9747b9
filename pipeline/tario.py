"""Webdataset tar parsing: a whole shard's bytes, or byte ranges located by the .idx.

A sample is the run of tar members sharing a key, webdataset-style: the key is
the member name up to the first dot of its base name, the rest is the
extension (``n01440764_10026.jpg`` -> key ``n01440764_10026``, ext ``jpg``).
The DALI index (format v1.2) lists per sample each member's extension, data
offset, size and name, so a byte range of consecutive samples can be sliced
without parsing tar headers at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 512
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class TarFormatError(ValueError):
    """Bytes that are not a well-formed (or complete) tar / index."""


def split_name(name: str) -> tuple[str, str]:
    """'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg')."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


@dataclass(frozen=True, slots=True)
class RawSample:
    """What the loader needs of one sample: its key, the bytes of its image member
    (the first of jpg/jpeg/png/webp) and of its ``.cls`` label (None if absent).
    Other members (``.json``) are not read into memory."""

    key: str
    image: bytes | None
    label: bytes | None


def _pick(members: dict[str, bytes]) -> tuple[bytes | None, bytes | None]:
    lower = {e.lower(): v for e, v in members.items()}
    image = next((lower[e] for e in IMAGE_EXTS if e in lower), None)
    return image, lower.get("cls")


@dataclass(frozen=True, kw_only=True)
class ShardIndex:
    """The parsed .idx: per sample its member list and its byte span in the tar."""

    members: tuple[tuple[tuple[str, int, int, str], ...], ...]  # (ext, offset, size, name)
    begin: np.ndarray  # int64 [n]: first data byte of the sample (after its header)
    end: np.ndarray  # int64 [n]: one past the last data byte
    keys: tuple[str, ...]
    image: np.ndarray  # int64 [n, 2]: (offset, size) of the image member, -1 if none
    label: np.ndarray  # int64 [n, 2]: (offset, size) of the .cls member, -1 if none

    def __len__(self) -> int:
        return len(self.members)

    def ranges(
        self, indices: np.ndarray, merge_gap: int, max_bytes: int
    ) -> list[tuple[int, int, np.ndarray]]:
        """Group sorted sample INDICES into byte ranges (start, stop, indices): runs whose
        gaps are at most MERGE_GAP bytes are read together, up to MAX_BYTES per range."""
        out: list[tuple[int, int, np.ndarray]] = []
        if len(indices) == 0:
            return out
        b = self.begin[indices]
        e = self.end[indices]
        first = 0
        for i in range(1, len(indices) + 1):
            if i == len(indices) or b[i] - e[i - 1] > merge_gap or e[i] - b[first] > max_bytes:
                out.append((int(b[first]), int(e[i - 1]), indices[first:i]))
                first = i
        return out


def parse_index(text: str, *, source: str = "index") -> ShardIndex:
    """Parse a DALI webdataset index (v1.2: a header line ``v1.2 N``, then one line per sample)."""
    lines = text.splitlines()
    if not lines:
        raise TarFormatError(f"{source} is empty")
    head = lines[0].split()
    if len(head) != 2 or head[0] != "v1.2":
        raise TarFormatError(
            f"{source}: unsupported index header {lines[0][:40]!r} (want 'v1.2 N')"
        )
    if not head[1].isdigit():
        raise TarFormatError(f"{source}: bad sample count in header {lines[0][:40]!r}")
    count = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != count:
        raise TarFormatError(f"{source} declares {count} samples but lists {len(body)}")
    members = []
    keys = []
    begin = np.empty(count, dtype=np.int64)
    end = np.empty(count, dtype=np.int64)
    image = np.full((count, 2), -1, dtype=np.int64)
    label = np.full((count, 2), -1, dtype=np.int64)
    for i, line in enumerate(body):
        parts = line.split(" ")
        if len(parts) % 4 or not all(p.isdigit() for p in parts[1::4] + parts[2::4]):
            raise TarFormatError(f"{source}: line {i + 2} is malformed")
        sample = tuple(
            (parts[j], int(parts[j + 1]), int(parts[j + 2]), parts[j + 3])
            for j in range(0, len(parts), 4)
        )
        members.append(sample)
        keys.append(split_name(sample[0][3])[0])
        begin[i] = min(m[1] for m in sample)
        end[i] = max(m[1] + m[2] for m in sample)
        exts = {m[0].lower(): m for m in sample}
        img = next((exts[e] for e in IMAGE_EXTS if e in exts), None)
        if img is not None:
            image[i] = img[1:3]
        if "cls" in exts:
            label[i] = exts["cls"][1:3]
    return ShardIndex(
        members=tuple(members), begin=begin, end=end, keys=tuple(keys), image=image, label=label
    )


def slice_samples(
    buf: bytes, buf_start: int, index: ShardIndex, indices: np.ndarray
) -> list[RawSample]:
    """Cut samples INDICES out of BUF, which holds tar bytes from offset BUF_START."""
    n = len(buf)
    img = index.image[indices]
    lab = index.label[indices]
    # Every member must lie inside the bytes read; a short buffer means a truncated shard.
    for arr in (img, lab):
        present = arr[:, 0] >= 0
        if present.any():
            lo = arr[present, 0] - buf_start
            if lo.min() < 0 or (lo + arr[present, 1]).max() > n:
                raise TarFormatError("a sample lies outside the bytes read (truncated shard?)")
    keys = index.keys
    out = []
    for i, (io_, isz), (lo_, lsz) in zip(indices.tolist(), img.tolist(), lab.tolist(), strict=True):
        a = io_ - buf_start
        b = lo_ - buf_start
        out.append(
            RawSample(
                keys[i],
                buf[a : a + isz] if io_ >= 0 else None,
                buf[b : b + lsz] if lo_ >= 0 else None,
            )
        )
    return out


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes > 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def iter_tar(data: bytes):
    """Yield (name, member bytes) of the regular files of a complete tar in DATA."""
    pos = 0
    n = len(data)
    long_name: str | None = None
    while pos + BLOCK <= n:
        header = data[pos : pos + BLOCK]
        if header == b"\0" * BLOCK:
            return
        if sum(header[:148]) + 256 + sum(header[156:]) != _octal(header[148:156]):
            raise TarFormatError(f"bad tar header checksum at byte {pos}")
        size = _octal(header[124:136])
        kind = header[156:157]
        start = pos + BLOCK
        stop = start + size
        if stop > n:
            raise TarFormatError(f"tar member at byte {pos} is cut off (truncated shard)")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and prefix:
            name = prefix + "/" + name
        pos = start + -(-size // BLOCK) * BLOCK
        if kind == b"L":
            long_name = data[start:stop].split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind == b"x":
            long_name = _pax_path(data[start:stop]) or long_name
            continue
        if kind in (b"0", b"\0"):
            yield (long_name or name), data[start:stop]
        long_name = None
    if pos != n:
        raise TarFormatError("tar ends inside a header or member (truncated shard)")


def tar_samples(data: bytes) -> list[RawSample]:
    """All samples of a complete tar, in file order (members grouped by key)."""
    grouped: list[tuple[str, dict[str, bytes]]] = []
    for name, payload in iter_tar(data):
        key, ext = split_name(name)
        if not key or key.endswith("/") or not ext:
            continue
        if grouped and grouped[-1][0] == key:
            grouped[-1][1][ext] = payload
        else:
            grouped.append((key, {ext: payload}))
    return [RawSample(key, *_pick(members)) for key, members in grouped]
