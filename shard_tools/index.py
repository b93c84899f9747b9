"""``shard index``: DALI index files for webdataset tars made by other tools.

The scan reads each tar once, in order, with Python's ``tarfile`` (so pax
and GNU long-name headers are handled) and groups members into samples by
the format's rule (:mod:`shard_tools.format.names`), as ``wds2idx`` does. The
index of ``NAME.tar`` is ``NAME.idx`` (only ``.tar`` is dropped, so
``a.train.00001.tar`` and ``a.train.00002.tar`` get two indexes).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

from shard_tools.format import index_line, index_name, index_text, is_compressed_tar, scan_samples
from shard_tools.sources import SourceError, expand_tar_patterns
from shard_tools.storage import Destination


def index_tars(
    patterns: list[str], *, storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[str, str, int]]:
    """Write ``<tar>.idx`` next to every tar matching PATTERNS; yield (tar, idx, samples)."""
    for url in expand_tar_patterns(patterns, storage_options):
        if is_compressed_tar(url):
            raise SourceError(
                f"{url}: a compressed tar has no byte offsets to index (DALI reads only "
                "uncompressed tars with an index); decompress it, or adopt it as it is "
                "(`shard adopt` reads it whole)"
            )
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        dest = Destination(folder, storage_options)
        try:
            with dest.open_read(name) as f:
                lines = [index_line(members) for _, members in scan_samples(f)]
        except tarfile.TarError as exc:
            raise SourceError(f"{url}: not a readable uncompressed tar ({exc})") from None
        if not lines:
            raise SourceError(f"{url}: holds no samples (DALI cannot index an empty tar)")
        idx = index_name(name)
        dest.write_bytes(idx, index_text(lines).encode("utf-8"))
        yield url, f"{folder}/{idx}", len(lines)
