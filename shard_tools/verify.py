"""``shard verify``: re-read every shard and check it against the manifest.

Each shard is streamed once: its bytes are hashed while ``tarfile`` walks its
members, so one pass checks the size, the sha256, the sample count and the
``.idx`` file (rebuilt from the real offsets and compared byte for byte);
``--decode`` also fully decodes every image member with PIL.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from shard_tools.format import (
    IMAGE_EXTS,
    ShardInfo,
    index_line,
    index_text,
    is_compressed_tar,
    options_for,
    parse_labels,
    read_manifest,
    scan_samples,
)
from shard_tools.storage import Destination


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, f) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(8 * 2**20):
            pass


@dataclass
class VerifyReport:
    """What ``verify`` found: problems name the shard (and sample) at fault."""

    dest: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    decoded: int = 0
    unhashed: int = 0  # adopted without --hash: sizes and indexes checked, no sha256
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary_line(self) -> str:
        state = "OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)"
        decoded = f", {self.decoded:,} images decoded" if self.decoded else ""
        unhashed = f", {self.unhashed} without a sha256 to check" if self.unhashed else ""
        return (
            f"verify {self.dest}: {state}; {self.shards} shards, {self.samples:,} samples, "
            f"{self.bytes / 1e6:,.1f} MB checked{decoded}{unhashed}"
        )


def _decode_problem(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_shard(
    dest: Destination, shards: Destination, shard: ShardInfo, decode: bool, report: VerifyReport
) -> None:
    name = shard.name
    if not shards.exists(name):
        report.problems.append(f"{name}: missing")
        return
    size = shards.size(name)
    if size != shard.bytes:
        report.problems.append(f"{name}: size {size} bytes, manifest says {shard.bytes}")
    kept = None  # an adopted shard's index lists the samples it kept, in order
    if shard.labels:
        try:
            kept = set(parse_labels(dest.read_bytes(shard.labels).decode("utf-8"))[1])
        except FileNotFoundError:
            report.problems.append(f"{shard.labels}: missing (labels of {name})")
        except ValueError as exc:
            report.problems.append(f"{shard.labels}: {exc}")
    lines, samples = [], 0
    with shards.open_read(name) as f:
        reader = _HashingReader(f)
        stream = gzip.GzipFile(fileobj=reader, mode="rb") if is_compressed_tar(name) else reader
        try:
            for key, members in scan_samples(
                stream, read=lambda ext: decode and ext.lower() in IMAGE_EXTS
            ):
                if kept is not None and key not in kept:
                    continue
                samples += 1
                lines.append(index_line(members))
                for _ext, _, _, member, data in members:
                    if data is None:
                        continue
                    report.decoded += 1
                    problem = _decode_problem(data)
                    if problem:
                        report.problems.append(
                            f"{name}: sample {key} ({member}) does not decode: {problem}"
                        )
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            report.problems.append(f"{name}: unreadable tar: {exc}")
        reader.drain()
    if shard.sha256 and reader.sha.hexdigest() != shard.sha256:
        report.problems.append(f"{name}: sha256 mismatch (content changed or corrupt)")
    if not shard.sha256:
        report.unhashed += 1
    if samples != shard.samples:
        report.problems.append(f"{name}: {samples} samples, manifest says {shard.samples}")
    if shard.index:
        try:
            idx = dest.read_bytes(shard.index).decode("utf-8", "replace")
        except FileNotFoundError:
            report.problems.append(f"{shard.index}: missing (index of {name})")
        else:
            if idx != index_text(lines):
                report.problems.append(f"{shard.index}: does not match the offsets in {name}")
    report.shards += 1
    report.samples += samples
    report.bytes += reader.count


def verify(
    dest_url: str, *, decode: bool = False, storage_options: dict[str, Any] | None = None
) -> VerifyReport:
    """Check every shard of the dataset at DEST_URL; raises ManifestError if it has no valid manifest."""
    manifest = read_manifest(dest_url, options_for(dest_url, storage_options))
    dest = Destination(dest_url, storage_options)
    shards = Destination(manifest.base_url, storage_options) if manifest.base_url else dest
    report = VerifyReport(dest=dest_url)
    for shard in manifest.shards:
        _check_shard(dest, shards, shard, decode, report)
    return report
