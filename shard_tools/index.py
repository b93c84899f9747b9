"""``shard index``: DALI index files for webdataset tars made by other tools.

The scan reads each tar once, in order, with Python's ``tarfile`` (so pax
and GNU long-name headers are handled) and groups members into samples the
way ``wds2idx`` does: regular files only, key = name up to the first dot of
the base name, consecutive members with the same key form one sample.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from shard_tools.sources import SourceError, expand_tar_patterns
from shard_tools.storage import Destination
from shard_tools.tarwrite import index_text, split_name

# (ext, data offset, size, member name, data if requested else None)
Member = tuple[str, int, int, str, bytes | None]


def scan_samples(
    fileobj: BinaryIO, *, read: Callable[[str], bool] = lambda ext: False
) -> Iterator[tuple[str, list[Member]]]:
    """Yield (key, members) per sample of the tar in FILEOBJ, streaming.

    Member data is read (and returned) only where ``read(ext)`` is true.
    """
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        key: str | None = None
        members: list[Member] = []
        for m in tf:
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
            members.append((ext, m.offset_data, m.size, m.name, data))
        if key is not None:
            yield key, members


def index_line(members: list[Member]) -> str:
    return " ".join(f"{ext} {off} {size} {name}" for ext, off, size, name, _ in members)


def idx_name_for(tar_name: str) -> str:
    """The index name wds2idx derives: the tar name up to the first dot of its base name, + .idx."""
    base = tar_name.rsplit("/", 1)[-1]
    dot = base.find(".", 1)
    return (base[:dot] if dot > 0 else base) + ".idx"


def index_tars(
    patterns: list[str], *, storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[str, str, int]]:
    """Write ``<tar>.idx`` next to every tar matching PATTERNS; yield (tar, idx, samples)."""
    for url in expand_tar_patterns(patterns, storage_options):
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        dest = Destination(folder, storage_options)
        try:
            with dest.open_read(name) as f:
                lines = [index_line(members) for _, members in scan_samples(f)]
        except tarfile.TarError as exc:
            raise SourceError(f"{url}: not a readable uncompressed tar ({exc})") from None
        if not lines:
            raise SourceError(f"{url}: holds no samples (DALI cannot index an empty tar)")
        idx = idx_name_for(name)
        dest.write_bytes(idx, index_text(lines).encode("utf-8"))
        yield url, f"{folder}/{idx}", len(lines)
