"""The tar layout of a shard: headers written, members read back, samples grouped.

Writing: every header has mtime 0, uid/gid 0, empty user/group names and mode
0644, in plain ustar format, so equal samples give equal bytes on any machine.
The layout is exactly what Python's ``tarfile`` writes for the same members in
USTAR format (two zero blocks at the end, padding to a 10 KiB record). A member
name longer than ustar's 100 bytes gets a pax extended header (``path=``)
first, as POSIX.1-2001 defines; readers (``tarfile``, webdataset, DALI) take
the name from it.

Reading: :func:`iter_tar` walks the bytes of a whole tar (ustar, GNU long
names, pax paths) without ``tarfile``'s per-member objects; :func:`scan_samples`
streams any file object through ``tarfile`` once (local or remote, large
files). Both group consecutive members into samples by the rule of
:mod:`shard_tools.format.names`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from shard_tools.format.names import LABEL_EXT, image_ext, split_name

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile.RECORDSIZE: archives are padded to a whole record
NAME_BYTES = 100  # ustar's name field
MAX_MEMBER_BYTES = 8**11 - 1  # 11 octal digits

# Header fields after the name that never change (ustar, regular file):
# mode, uid, gid come before size; mtime, checksum, type, link name and the
# ustar magic after it. The checksum is filled in per header.
_MODE_UID_GID = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"
_MTIME = b"00000000000\x00"


def _after_checksum(typeflag: bytes) -> bytes:
    return (
        typeflag
        + b"\x00" * 100  # linkname
        + b"ustar\x0000"  # magic + version
        + b"\x00" * 32  # uname
        + b"\x00" * 32  # gname
        + b"\x00" * 16  # devmajor, devminor: empty for regular files, as tarfile writes them
        + b"\x00" * 155  # prefix
        + b"\x00" * 12  # padding to 512
    )


_FILE_TAIL = _after_checksum(b"0")
_PAX_TAIL = _after_checksum(b"x")
PAX_HEADER_NAME = b"././@PaxHeader"


class TarFormatError(ValueError):
    """Bytes that are not a well-formed (or complete) tar / index."""


def _header(raw_name: bytes, size: int, tail: bytes) -> bytes:
    size_field = b"%011o\x00" % size
    # The checksum is the byte sum of the header with its own field as spaces.
    chksum = sum(raw_name) + sum(_MODE_UID_GID) + sum(size_field) + sum(_MTIME) + 8 * 0x20
    chksum += sum(tail)
    return b"".join(
        (
            raw_name,
            b"\x00" * (NAME_BYTES - len(raw_name)),
            _MODE_UID_GID,
            size_field,
            _MTIME,
            b"%06o\x00 " % chksum,
            tail,
        )
    )


def _pax_record(key: str, value: str) -> bytes:
    """One pax record, ``"<len> key=value\\n"``, whose length counts its own digits."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) for a regular file NAME of SIZE bytes: one ustar block, or,
    for a name over 100 bytes, a pax header carrying it first (padded to whole blocks)."""
    raw = name.encode("utf-8")
    if size > MAX_MEMBER_BYTES:
        raise ValueError(f"tar member {name!r} is larger than 8 GiB")
    if len(raw) <= NAME_BYTES:
        return _header(raw, size, _FILE_TAIL)
    records = _pax_record("path", name)
    pax = _header(PAX_HEADER_NAME, len(records), _PAX_TAIL)
    pad = b"\x00" * (padded(len(records)) - len(records))
    # The ustar name field holds the name's first 100 bytes, cut at a whole character.
    short = raw[:NAME_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return pax + records + pad + _header(short, size, _FILE_TAIL)


def padded(size: int) -> int:
    """SIZE rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


def finished_size(body_bytes: int) -> int:
    """Size of a tar whose members take BODY_BYTES, after the end-of-archive trailer."""
    return -(-(body_bytes + 2 * BLOCK) // RECORD) * RECORD


# -- reading -----------------------------------------------------------------------


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes > 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad octal number {text[:12]!r} in a tar header") from None


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def iter_tar(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """Yield (name, data offset, member bytes) of the regular files of a complete tar."""
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
        pos = start + padded(size)
        if kind == b"L":
            long_name = data[start:stop].split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind == b"x":
            long_name = _pax_path(data[start:stop]) or long_name
            continue
        if kind in (b"0", b"\0"):
            yield (long_name or name), start, data[start:stop]
        long_name = None
    if pos != n:
        raise TarFormatError("tar ends inside a header or member (truncated shard)")


@dataclass(slots=True)  # not frozen: a frozen dataclass is built 4x slower, per sample
class RawSample:
    """What the loader needs of one sample: its key, the bytes of its image member
    (the first of jpg/jpeg/png/webp) and its label: the ``.cls`` bytes, an int an
    adopted dataset's ``.labels`` gave, or None. EXTRA: the members a loader asked
    for by extension (``txt``, ``json``), absent ones left out; nothing else is read.
    The image may be a memoryview of the bytes read (slice_samples' image_views)."""

    key: str
    image: bytes | memoryview | None
    label: bytes | int | None
    extra: dict[str, bytes] | None = None


def pick(members: dict[str, bytes]) -> tuple[bytes | None, bytes | None]:
    """(image bytes, label bytes) of a sample's members by extension (None if absent)."""
    ext = image_ext(members)
    label = next((v for e, v in members.items() if e.lower() == LABEL_EXT), None)
    return (members[ext] if ext is not None else None), label


def tar_samples(data: bytes, extra: tuple[str, ...] = ()) -> list[RawSample]:
    """All samples of a complete tar, in file order (members grouped by key), with the
    members of the (lower-case) extensions EXTRA."""
    grouped: list[tuple[str, dict[str, bytes]]] = []
    for name, _, payload in iter_tar(data):
        key, ext = split_name(name)
        if not key or key.endswith("/") or not ext:
            continue
        if grouped and grouped[-1][0] == key:
            grouped[-1][1][ext] = payload
        else:
            grouped.append((key, {ext: payload}))
    out = []
    for key, members in grouped:
        more = {e.lower(): v for e, v in members.items() if e.lower() in extra} if extra else None
        out.append(RawSample(key, *pick(members), more))
    return out


class Member(NamedTuple):
    """One member of a sample as a scan found it (DATA only where it was asked for)."""

    ext: str
    offset: int  # of the data, in the tar
    size: int
    name: str
    data: bytes | None


def scan_samples(
    fileobj: BinaryIO,
    *,
    read: Callable[[str], bool] = lambda ext: False,
    check: Callable[[tarfile.TarInfo], None] | None = None,
    seekable: bool = False,
) -> Iterator[tuple[str, list[Member]]]:
    """Yield (key, members) per sample of the tar in FILEOBJ, reading it once, in order.

    Only regular files count; names without a key (``.hidden``, ``dir/``) are
    skipped. Member data is read (and returned) only where ``read(ext)`` is
    true. CHECK sees every member first and may raise to refuse the tar.
    SEEKABLE (a local file): seek past the data of members not read, so only
    headers are read.
    """
    with tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|") as tf:
        key: str | None = None
        members: list[Member] = []
        for m in tf:
            if check is not None:
                check(m)
            if not m.isfile():
                continue
            k, ext = split_name(m.name)
            if not k or k.endswith("/"):
                continue
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, []
            data = tf.extractfile(m).read() if read(ext) else None
            members.append(Member(ext, m.offset_data, m.size, m.name, data))
        if key is not None:
            yield key, members
