"""A dataset destination (local folder or fsspec URL) with all-or-nothing writes.

A file becomes visible under its final name only when it is complete:

- local: written to ``DEST/.tmp/<name>``, flushed and fsync'ed, then
  ``os.replace``d into place (atomic within one file system);
- S3 (``s3://``, ``s3a://``): written straight to the final key. An S3 object
  exists only once its single PUT or its multipart upload's *Complete* call
  succeeds, so a killed writer leaves no object (at most an incomplete
  multipart upload, invisible to readers and removed by the bucket's
  lifecycle rule). A temp key + copy would double the bytes moved for no
  extra safety. On an exception the upload is aborted, never completed;
- any other fsspec file system: written to ``DEST/.tmp/<name>`` and moved
  with ``fs.mv`` (a rename where the file system has one).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec

from shard_tools.format import join_url, options_for

TMP_DIR = ".tmp"
_S3_PROTOCOLS = {"s3", "s3a"}
_BLOCK_SIZE = 16 * 2**20  # S3 multipart part size: fewer, larger requests


def storage_options_from(endpoint_url: str | None, profile: str | None) -> dict[str, Any]:
    """fsspec options for S3 from CLI flags (credentials stay in the environment)."""
    opts: dict[str, Any] = {}
    if endpoint_url:
        opts["client_kwargs"] = {"endpoint_url": endpoint_url}
    if profile:
        opts["profile"] = profile
    return opts


class Destination:
    """The dataset root: list, read and atomically write the files in it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") or url
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options_for(url, storage_options))
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols
        self.is_s3 = bool(_S3_PROTOCOLS & set(protocols))

    def path(self, name: str) -> str:
        return join_url(self.root, name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def names(self, subdir: str = "") -> list[str]:
        """Plain file names directly under the root (or SUBDIR); [] if absent."""
        base = self.path(subdir) if subdir else self.root
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file"
        )

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def open_read(self, name: str) -> BinaryIO:
        return self.fs.open(self.path(name), "rb", block_size=_BLOCK_SIZE)

    def makedirs(self) -> None:
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
        elif not self.is_s3:
            self.fs.makedirs(self.root, exist_ok=True)

    @contextlib.contextmanager
    def atomic_writer(self, name: str, *, durable: bool = True) -> Iterator[BinaryIO]:
        """Yield a binary sink; NAME appears only if the block exits normally.

        DURABLE (local files): fsync before the rename, so that after a power
        loss the name holds the whole file or nothing. Files that are only
        hints (the resume journal) skip it.
        """
        final = self.path(name)
        if self.is_s3:
            f = self.fs.open(final, "wb", block_size=_BLOCK_SIZE)
            try:
                yield f
            except BaseException:
                f.discard()  # abort the multipart upload: nothing becomes visible
                f.closed = True  # so that garbage collection does not try to finish it
                raise
            f.close()  # the PUT, or the multipart Complete: the object appears now
            return
        tmp = join_url(self.path(TMP_DIR), name)
        if self.is_local:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            f = open(tmp, "wb", buffering=2**20)  # noqa: SIM115 - closed on both paths below
            try:
                yield f
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            except BaseException:
                f.close()
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            f.close()
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(tmp, final)
            return
        with self.fs.open(tmp, "wb") as f:
            yield f
        self.fs.mv(tmp, final)

    def write_bytes(self, name: str, data: bytes, *, durable: bool = True) -> None:
        with self.atomic_writer(name, durable=durable) as f:
            f.write(data)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(name), recursive=True)
