"""Deterministic tar writing with the DALI index built from the offsets we write.

Every header has mtime 0, uid/gid 0, empty user/group names and mode 0644, in
plain ustar format, so equal samples give equal bytes on any machine, with any
number of workers and on any storage. The layout is exactly what Python's
``tarfile`` writes for the same members (two zero blocks, then padding to a
10 KiB record), which the tests check.

The ``.idx`` file is DALI's webdataset index, format v1.2 as written by its
``wds2idx`` tool: a line ``v1.2 <samples>``, then one line per sample listing
``<ext> <data offset> <size> <member name>`` for each of its members.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile.RECORDSIZE: archives are padded to a whole record
IDX_VERSION = "v1.2"

# Header fields after the name that never change (ustar, regular file):
# mode, uid, gid come before size; mtime, checksum, type, link name and the
# ustar magic after it. The checksum is filled in per header.
_MODE_UID_GID = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"
_MTIME = b"00000000000\x00"
_AFTER_CHKSUM = (
    b"0"  # typeflag: regular file
    + b"\x00" * 100  # linkname
    + b"ustar\x0000"  # magic + version
    + b"\x00" * 32  # uname
    + b"\x00" * 32  # gname
    + b"\x00" * 16  # devmajor, devminor: empty for regular files, as tarfile writes them
    + b"\x00" * 155  # prefix
    + b"\x00" * 12  # padding to 512
)
_MAX_SIZE = 8**11 - 1  # 11 octal digits


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header for a regular file NAME of SIZE bytes."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    if size > _MAX_SIZE:
        raise ValueError(f"tar member {name!r} is larger than 8 GiB")
    head = raw.ljust(100, b"\x00") + _MODE_UID_GID + b"%011o\x00" % size + _MTIME
    chksum = sum(head) + sum(_AFTER_CHKSUM) + 8 * 0x20
    return head + b"%06o\x00 " % chksum + _AFTER_CHKSUM


def padded(size: int) -> int:
    """SIZE rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


def sample_tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes one sample adds to a tar (headers and padding included)."""
    return sum(BLOCK + padded(len(data)) for _, data in members)


def finished_size(body_bytes: int) -> int:
    """Size of a tar whose members take BODY_BYTES, after the end-of-archive trailer."""
    return -(-(body_bytes + 2 * BLOCK) // RECORD) * RECORD


class ShardTarWriter:
    """Append samples to a binary sink, hashing the bytes and recording the index.

    ``finish()`` writes the end-of-archive trailer and returns the index text;
    ``bytes_written`` and ``sha256`` then describe the whole file, so the
    shard never has to be read again to be checksummed or indexed.
    """

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self.bytes_written = 0
        self.samples = 0
        self.first_key = ""
        self.last_key = ""
        self._idx_lines: list[str] = []

    def _write(self, data: bytes) -> None:
        self._sink.write(data)
        self._hash.update(data)
        self.bytes_written += len(data)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Write one sample: members ``(ext, data)`` become ``<key>.<ext>``."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key must be a plain name without dots: {key!r}")
        parts = []
        for ext, data in members:
            name = f"{key}.{ext}"
            header = tar_header(name, len(data))
            offset = self.bytes_written + BLOCK
            pad = padded(len(data)) - len(data)
            self._write(header + data + b"\x00" * pad if pad else header + data)
            parts.append(f"{ext} {offset} {len(data)} {name}")
        self._idx_lines.append(" ".join(parts))
        if not self.samples:
            self.first_key = key
        self.last_key = key
        self.samples += 1

    def size_if_added(self, members: list[tuple[str, bytes]]) -> int:
        """The finished file size if this sample were added now."""
        return finished_size(self.bytes_written + sample_tar_bytes(members))

    def finish(self) -> str:
        """Write the trailer; return the DALI index text for what was written."""
        self._write(b"\x00" * (finished_size(self.bytes_written) - self.bytes_written))
        return index_text(self._idx_lines)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def index_text(sample_lines: list[str]) -> str:
    """The whole .idx file from one line per sample."""
    return f"{IDX_VERSION} {len(sample_lines)}\n" + "".join(line + "\n" for line in sample_lines)


def split_name(path: str) -> tuple[str, str]:
    """Split a member name into (key, extension) exactly as ``wds2idx`` does."""
    dot = path.find(".", path.rfind("/") + 1)
    return path[:dot], path[dot + 1 :]
