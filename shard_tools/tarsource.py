"""Existing webdataset tars as input: their samples, each sample's image and label.

Shared by ``shard pack`` (re-pack foreign or own tars) and ``shard adopt``
(index foreign tars where they are). A sample is what the format says
(:mod:`shard_tools.format.names`); this module adds what a tar from another
tool needs:

- members of one sample that are not adjacent (``tar cf`` of an unsorted
  folder): ``group=True`` merges them (a re-pack writes them adjacent);
  ``group=False`` refuses the tar naming the first split key (a tar read in
  place would be split by every webdataset reader);
- the image: the member whose extension is exactly an image extension, in any
  case (``jpg`` before ``png`` ...); a sample whose only images have dotted
  extensions uses the one it has, and one with several of those (``a.b1.jpg``,
  ``a.b2.jpg``: ten files with the key ``a``) is rejected with the reason;
- the label: from ``.cls`` (any case) or a field of ``.json``, as a
  :class:`~shard_tools.labels.LabelSpec` says;
- ``.tar.gz`` / ``.tgz`` shards, read through gzip.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec

from shard_tools import labels
from shard_tools.format import (
    IMAGE_EXTS,
    INPUT_IMAGE_EXTS,
    LABEL_EXT,
    META_EXT,
    Member,
    is_compressed_tar,
    scan_samples,
)
from shard_tools.storage import options_for

SMALL_EXTS = (LABEL_EXT, META_EXT)  # read during the scan: labels, and hints about them
STREAM_BLOCK = 16 * 2**20  # a scan reads each tar front to back once: large blocks


class TarSourceError(Exception):
    """A tar that cannot be used as a whole (unreadable, unsafe, members not adjacent)."""


@dataclass
class TarSample:
    """One sample of a tar: its members in tar order and the small ones' bytes."""

    key: str
    members: list[Member]
    small: dict[str, bytes] = field(default_factory=dict)  # lower-case ext -> bytes

    def image(self) -> tuple[Member | None, str | None]:
        """(the image member, None) or (None, why the sample has no usable image)."""
        exact = {m.ext.lower(): m for m in self.members if m.ext.lower() in INPUT_IMAGE_EXTS}
        for ext in (*IMAGE_EXTS, *INPUT_IMAGE_EXTS):
            if ext in exact:
                return exact[ext], None
        dotted = [m for m in self.members if m.ext.rsplit(".", 1)[-1].lower() in INPUT_IMAGE_EXTS]
        if len(dotted) == 1:
            return dotted[0], None
        if not dotted:
            return None, "sample has no image member"
        names = ", ".join(m.name for m in dotted[:4]) + (", ..." if len(dotted) > 4 else "")
        return None, (
            f"several image members share one key ({len(dotted)}: {names}): a key ends at the "
            "first dot of a file name (webdataset's rule); rename the files so that each image "
            "has a key of its own"
        )

    def label_value(self, spec: labels.LabelSpec) -> tuple[Any, str]:
        """The raw label (None if absent) and, if absent, why."""
        if spec.kind == "cls":
            raw = self.small.get(LABEL_EXT)
            if raw is None:
                return None, "sample has no .cls label"
            return raw.decode("utf-8", "replace").strip(), ""
        if spec.kind == "json":
            meta = self.meta()
            if meta is None:
                return None, f"sample has no readable .json member (for --label json:{spec.path})"
            value = labels.field(meta, spec.path)
            if value is None:
                return None, f"its .json has no field {spec.path}"
            return value, ""
        return -1, ""

    def meta(self) -> Any:
        raw = self.small.get(META_EXT)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None


def open_tar_stream(url: str, storage_options: dict[str, Any] | None) -> BinaryIO:
    """The bytes of the tar at URL as a stream (decompressed for .tar.gz / .tgz)."""
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    raw = fs.open(path, "rb", block_size=STREAM_BLOCK)
    return gzip.GzipFile(fileobj=raw, mode="rb") if is_compressed_tar(url) else raw


def scan_tar(
    url: str,
    storage_options: dict[str, Any] | None,
    *,
    group: bool,
    check=None,
    counts: dict[str, int] | None = None,
) -> Iterator[TarSample]:
    """The samples of the tar at URL, in tar order (see the module doc for GROUP).

    CHECK(member) may refuse the tar (unsafe names, links). COUNTS["split"] is
    raised by the samples that GROUP merged. Raises TarSourceError for an
    unreadable tar, or one whose samples are split while GROUP is false.
    """
    try:
        with open_tar_stream(url, storage_options) as f:
            yield from scan_stream(f, url, group=group, check=check, counts=counts)
    except FileNotFoundError:
        raise TarSourceError(f"tar {url} not found") from None


def scan_stream(
    stream: BinaryIO,
    url: str,
    *,
    group: bool,
    check=None,
    counts: dict[str, int] | None = None,
    seekable: bool = False,
) -> Iterator[TarSample]:
    """scan_tar over an open (decompressed) STREAM of the tar at URL; SEEKABLE: a local
    file, read header by header."""
    try:
        groups = scan_samples(
            stream, read=lambda ext: ext.lower() in SMALL_EXTS, check=check, seekable=seekable
        )
        if group:
            yield from _grouped(groups, counts if counts is not None else {})
        else:
            yield from _adjacent(url, groups)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        kind = "gzip-compressed tar" if is_compressed_tar(url) else "tar"
        raise TarSourceError(f"{url}: not a readable {kind} ({exc})") from None


def _sample(key: str, members: list[Member]) -> TarSample:
    small = {m.ext.lower(): m.data for m in members if m.data is not None}
    return TarSample(key, [m._replace(data=None) for m in members], small)


def _adjacent(url: str, groups) -> Iterator[TarSample]:
    seen: set[str] = set()
    for key, members in groups:
        if key in seen:
            raise TarSourceError(
                f"{url}: the members of sample {key} are not adjacent (it appears again after "
                "other samples): webdataset readers would split it. Write the tar sorted "
                "(e.g. tar --sort=name) or re-pack it with `shard pack`, which groups them"
            )
        seen.add(key)
        yield _sample(key, members)


def _grouped(groups, counts: dict[str, int]) -> Iterator[TarSample]:
    """Merge the runs of one key wherever they are (a whole tar's samples are held: the
    member lists only, images stay in the tar)."""
    by_key: dict[str, list[Member]] = {}
    for key, members in groups:
        if key in by_key:
            counts["split"] = counts.get("split", 0) + 1
        by_key.setdefault(key, []).extend(members)
    for key, members in by_key.items():
        yield _sample(key, members)


def local_copy(url: str, storage_options: dict[str, Any] | None, dest_path: str) -> str:
    """Decompress the .tar.gz at URL into DEST_PATH (so its members have byte offsets)."""
    with open_tar_stream(url, storage_options) as src, open(dest_path, "wb") as out:
        shutil.copyfileobj(src, out, STREAM_BLOCK)
    return dest_path
