"""webdataset's ShardWriter over one part of the input: the parallel packing baseline.

In a module of its own for the reason decode_worker.py gives: a pool worker
imports the module of its task, and this one imports only webdataset.
"""

from __future__ import annotations

from pathlib import Path

# At import, so that a fork server that preloads this module hands every worker a
# ready webdataset (which imports torch: seconds that would otherwise be timed).
import webdataset as wds


def write_part(
    files: list[str], labels: list[str], ids: dict[str, int], pattern: str, first_key: int
) -> int:
    """Copy FILES into shards named PATTERN (``%06d`` numbered), as one ShardWriter
    process of several does (webdataset's recipe: split the input, one writer per part)."""
    with wds.ShardWriter(pattern, maxcount=10_000, maxsize=256e6, verbose=0) as sink:
        for i, (path, label) in enumerate(zip(files, labels, strict=True)):
            meta = {"source": path, "label": ids[label], "class": label}
            sink.write(
                {
                    "__key__": f"{first_key + i:010d}",
                    "jpg": Path(path).read_bytes(),
                    "cls": ids[label],
                    "json": meta,
                }
            )
    return len(files)
