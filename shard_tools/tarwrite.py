"""Writing shards fast: samples built into tar bytes away from the writer, appended in order.

The bytes follow :mod:`shard_tools.format` (headers, member names, the
``.idx``); this module is the machinery around them: samples are turned into
their exact tar bytes (:func:`sample_chunk`) in worker processes, and one
:class:`ShardTarWriter` per shard appends them, hashing and writing on a
thread of its own and recording the index lines from the offsets it writes.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, NamedTuple

from shard_tools.format import check_key, finished_size, index_text, member_name, padded, tar_header


class FileRef(NamedTuple):
    """SIZE bytes at OFFSET of a local file that was validated as it was at STAMP.

    Large images kept byte for byte travel from worker to writer as this
    reference instead of as bytes: the writer reads them from the (warm) page
    cache, which costs far less than pickling them through a pipe.
    """

    path: str
    offset: int
    size: int
    stamp: tuple[int, int]  # (st_size, st_mtime_ns) of the file when validated


class SampleChunk(NamedTuple):
    """One sample as the exact bytes it adds to a tar, built away from the writer.

    Headers depend only on member names and sizes, never on the position in
    the shard, so workers build chunks and the writer only appends them. With
    ``file_ref``, the first member's data is not in ``data`` but in that file
    and belongs right after its header (at its offset in ``members``).
    """

    key: str
    data: bytes  # headers, member data and padding
    members: tuple[tuple[str, int, int], ...]  # (ext, data offset within the chunk, size)
    file_ref: FileRef | None = None

    @property
    def nbytes(self) -> int:
        return len(self.data) + (self.file_ref.size if self.file_ref else 0)


class ChangedFileError(OSError):
    """A file referenced by a FileRef changed between validation and writing."""


def read_ref(ref: FileRef) -> bytes:
    """The bytes a FileRef points at; ChangedFileError if the file changed since."""
    with open(ref.path, "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_size, st.st_mtime_ns) != ref.stamp:
            raise ChangedFileError(f"{ref.path} changed while it was being packed")
        f.seek(ref.offset)
        data = f.read(ref.size)
    if len(data) != ref.size:
        raise ChangedFileError(f"{ref.path} changed while it was being packed")
    return data


def sample_chunk(
    key: str,
    members: list[tuple[str, bytes]],
    *,
    file_ref: FileRef | None = None,
    plain: bool = True,
) -> SampleChunk:
    """Build the tar bytes of sample KEY; members ``(ext, data)`` become ``<key>.<ext>``.

    With FILE_REF, the first member's data is the referenced bytes (and its
    ``data`` in MEMBERS is ignored). PLAIN (what ``shard pack`` writes): the key
    is one name without a folder; otherwise any key the format can represent.
    """
    if plain and "/" in key:
        raise ValueError(f"sample key must be a plain name without '/': {key!r}")
    check_key(key)
    parts: list[bytes] = []
    index = []
    offset = 0
    for i, (ext, data) in enumerate(members):
        by_ref = file_ref is not None and i == 0
        size = file_ref.size if by_ref else len(data)
        pad = padded(size) - size
        header = tar_header(member_name(key, ext), size)
        parts.append(header)
        if not by_ref:
            parts.append(data)
        parts.append(b"\x00" * pad)
        index.append((ext, offset + len(header), size))
        offset += len(header) + size + pad
    return SampleChunk(key, b"".join(parts), tuple(index), file_ref)


class ShardTarWriter:
    """Append samples to a binary sink, hashing the bytes and recording the index.

    ``finish()`` writes the end-of-archive trailer and returns the index text;
    ``bytes_written`` and ``sha256`` then describe the whole file, so the
    shard never has to be read again to be checksummed or indexed.

    Bytes are gathered into blocks of about ``BLOCK_BYTES`` and one thread of
    its own writes and hashes each block, in order. Both calls release the
    GIL on blocks this big, so hashing and writing (or uploading, for an S3
    sink) overlap with whatever produces the next samples instead of adding
    to it; a write error surfaces at the next block or at ``finish()``.
    Call ``close()`` (or ``finish()``) before closing the sink.
    """

    BLOCK_BYTES = 1 << 20
    MAX_QUEUED_BLOCKS = 8  # bounds memory: at most this many blocks wait to be written

    def __init__(self, sink: BinaryIO, *, sync_every: int | None = None) -> None:
        """SYNC_EVERY (a local file sink): fdatasync after every that many bytes, on
        the writer thread. The disk then writes while samples are still being
        produced, and the fsync before the shard's rename has little left to do."""
        self._sink = sink
        self._sync_every = sync_every
        self._unsynced = 0
        self._syncer: ThreadPoolExecutor | None = None
        self._syncing: Future | None = None
        self._hash = hashlib.sha256()
        self.bytes_written = 0
        self.samples = 0
        self.first_key = ""
        self.last_key = ""
        self._idx_lines: list[str] = []
        self._block: list[bytes] = []
        self._block_bytes = 0
        self._queued: deque[Future] = deque()
        self._thread: ThreadPoolExecutor | None = None
        self._finished = False

    def _write(self, data: bytes) -> None:
        self._block.append(data)
        self._block_bytes += len(data)
        self.bytes_written += len(data)
        if self._block_bytes >= self.BLOCK_BYTES:
            self._flush_block()

    def _flush_block(self) -> None:
        if not self._block:
            return
        # Many small pieces (small images) are joined: one write and one hash
        # update that release the GIL. A few large pieces go as they are:
        # copying them would cost more than the calls it saves.
        pieces = self._block if len(self._block) <= 16 else [b"".join(self._block)]
        self._block, self._block_bytes = [], 0
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-write")
        self._queued.append(self._thread.submit(self._write_pieces, pieces))
        while self._queued and (
            len(self._queued) > self.MAX_QUEUED_BLOCKS or self._queued[0].done()
        ):
            self._queued.popleft().result()  # re-raises a failed write here

    def _write_pieces(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._sink.write(piece)
            self._hash.update(piece)
            self._unsynced += len(piece)
        if self._sync_every and self._unsynced >= self._sync_every:
            self._sink.flush()
            self._unsynced = 0
            # On a thread of its own, so that writing goes on while the disk flushes;
            # one flush at a time (a later one covers whatever an earlier one missed).
            if self._syncing is None or self._syncing.done():
                if self._syncer is None:
                    self._syncer = ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="shard-sync"
                    )
                self._syncing = self._syncer.submit(os.fdatasync, self._sink.fileno())

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Write one sample: members ``(ext, data)`` become ``<key>.<ext>``."""
        self.add_chunk(sample_chunk(key, members))

    def add_chunk(self, chunk: SampleChunk) -> None:
        """Append a sample built by :func:`sample_chunk`."""
        base = self.bytes_written
        key = chunk.key
        if chunk.file_ref is None:
            self._write(chunk.data)
        else:
            split = chunk.members[0][1]  # the first member's data follows its header
            self._write(chunk.data[:split])
            self._write(read_ref(chunk.file_ref))
            self._write(chunk.data[split:])
        self._idx_lines.append(
            " ".join(
                f"{ext} {base + off} {size} {member_name(key, ext)}"
                for ext, off, size in chunk.members
            )
        )
        if not self.samples:
            self.first_key = key
        self.last_key = key
        self.samples += 1

    def size_if_added(self, chunk: SampleChunk) -> int:
        """The finished file size if CHUNK were added now."""
        return finished_size(self.bytes_written + chunk.nbytes)

    def finish(self) -> str:
        """Write the trailer and wait for every byte to reach the sink; return the index text."""
        self._write(b"\x00" * (finished_size(self.bytes_written) - self.bytes_written))
        self._flush_block()
        self._drain(raise_errors=True)
        self._finished = True
        return index_text(self._idx_lines)

    def close(self) -> None:
        """Stop the writer thread after an error, without raising: the shard is abandoned."""
        self._block, self._block_bytes = [], 0
        self._drain(raise_errors=False)

    def _drain(self, *, raise_errors: bool) -> None:
        try:
            while self._queued:
                future = self._queued.popleft()
                if raise_errors:
                    future.result()
                else:
                    future.exception()  # waits; the error is already being reported
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True, cancel_futures=True)
                self._thread = None
            if self._syncer is not None:
                self._syncer.shutdown(wait=True)
                self._syncer = None
                if raise_errors and self._syncing is not None:
                    self._syncing.result()

    @property
    def sha256(self) -> str:
        if not self._finished:
            raise RuntimeError("sha256 is known only after finish()")
        return self._hash.hexdigest()
