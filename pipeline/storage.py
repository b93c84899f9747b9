"""Reading shards through fsspec (local disk, S3, GCS, ...): few large reads, retried.

Object stores are fast for large sequential GETs and slow per request, so a
rank reads each shard (or the contiguous part of it that it owns) in as few
ranged requests as possible, at most ``max_read_mb`` each. Sub-ranges and
resume leftovers are located with the shard's ``.idx``; shards without one are
read whole. Every read is retried with exponential backoff; the final error
names the shard and the cause, never the credentials (those come from
``storage_options`` or the standard AWS variables and are not printed).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import mmap
import os
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from pipeline import columns
from pipeline.columns import Columns
from shard_tools.format import (
    Manifest,
    RawSample,
    ShardIndex,
    TarFormatError,
    is_compressed_tar,
    options_for,
    parse_index,
    parse_labels,
    read_manifest,
    redact,
    slice_samples,
    tar_samples,
)

log = logging.getLogger("pipeline")

MERGE_GAP_BYTES = 1 << 20  # read through gaps up to this size rather than issue another request
# A dataset keeps what it parsed and learnt of the shards it read (index, adopted labels,
# sample facts: ~190 bytes a sample) for this many samples, least recently used dropped
# first: a whole ImageNet-1k in ~240 MB, a web-scale pass in bounded memory. A shard
# dropped is parsed and checked again when next read (a few us a sample).
CACHED_SAMPLES = 1_300_000


# Whole shard files kept mapped by a Dataset that maps (a mapping costs address space, and
# page cache the kernel can reclaim, not memory of the process).
MAPPED_FILES = 64


def _map_file(path: str) -> mmap.mmap:
    """The local file PATH, mapped read-only whole (no copy). Its slices are copies,
    memoryviews of it are not; it is unmapped when the last of them goes. Pages are mapped
    as they are first touched and stay mapped while the mapping is kept: a mapping made
    per read faulted its pages in again every epoch, about one fault per small image
    (MAP_POPULATE costs more than those faults for photos: ~12 against ~10.5 us per 114 KB
    image)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size == 0:
            raise TarFormatError("short read: the shard file is empty (truncated shard?)")
        return mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def _adopted_labels(samples: list[RawSample], adopted, indices: np.ndarray) -> list[RawSample]:
    """SAMPLES (INDICES of a shard) with the labels adopt resolved (ADOPTED: the shard's
    .labels, or None), not the tar's own."""
    if adopted is None:
        return samples
    labels = adopted[0][indices].tolist()
    return [dataclasses.replace(s, label=lab) for s, lab in zip(samples, labels, strict=True)]


class ShardReadError(RuntimeError):
    """A shard (or its index) could not be read after all retries."""


class ShardDataError(ShardReadError):
    """A shard or index was read but its bytes are damaged (truncated, bad header,
    disagreeing with the manifest): reported at once, since reading again gives the same."""


@functools.cache
def _retryable() -> tuple[type[BaseException], ...]:
    """Storage errors a read is retried on (and reported as ShardReadError after).

    Only storage: an error of this code (a ValueError, a RuntimeError) is a bug and
    keeps its own type and traceback; damaged bytes are a ShardDataError.
    """
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        # s3fs re-raises connection-level failures (refused, reset, closed before a
        # response) as botocore's own types, which are not OSError. Imported only
        # when a read fails: local datasets never need botocore.
        from botocore.exceptions import BotoCoreError
    except ImportError:
        pass
    else:
        errors.append(BotoCoreError)
    try:  # fsspec's HTTP(S) filesystem: a dropped connection or an error status
        from aiohttp import ClientError
    except ImportError:
        pass
    else:
        errors.append(ClientError)
    return tuple(errors)


@dataclass(kw_only=True)
class Dataset:
    """A dataset: its manifest, and retried reads of its shards.

    A packed dataset's shards sit beside its manifest; an adopted one's below the
    manifest's ``base_url`` (another folder or bucket), with a ``.labels`` file per
    shard beside the manifest that lists the samples kept and their labels.
    """

    root: str
    manifest: Manifest
    fs: Any  # the manifest's folder: .idx and .labels files
    base: str
    shard_fs: Any = None  # the shards' storage (the same as FS unless adopted)
    shard_base: str = ""
    retries: int = 3
    retry_backoff_s: float = 0.5
    max_read_bytes: int = 64 << 20
    extra: tuple[str, ...] = ()  # member extensions handed over with each sample
    # Ranged reads of local shards map the file instead of copying it (the reader
    # process: what it reads is copied at most once, into shared memory). A shard
    # truncated in place while mapped kills the reading process with SIGBUS, which the
    # trainer reports for the reader process; the trainer's own Dataset never maps.
    map_local: bool = False
    _indexes: dict[int, ShardIndex | None] = field(default_factory=dict, repr=False)
    _labels: dict[int, tuple[np.ndarray, tuple[str, ...]] | None] = field(
        default_factory=dict, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _retried: int = field(default=0, repr=False)
    _unmappable: set[str] = field(default_factory=set, repr=False)  # read, not mapped
    _cached: int = field(default=0, repr=False)  # samples of the shards in _recent
    # shard name -> (its file mapped whole, (inode, size) when mapped): see _map_file
    _maps: dict[str, tuple[mmap.mmap, tuple[int, int]]] = field(default_factory=dict, repr=False)
    # What the shards' samples were found to be (columns.ShardFacts), by shard: 33 bytes a
    # sample read, beside ~150 its parsed .idx (_indexes) holds.
    _facts: dict[int, columns.ShardFacts] = field(default_factory=dict, repr=False)
    # Shards with something cached above, least recently used first -> their samples.
    _recent: OrderedDict[int, int] = field(default_factory=OrderedDict, repr=False)
    cached_samples: int = CACHED_SAMPLES  # at most this many samples' worth of the above

    @classmethod
    def open(cls, cfg) -> Dataset:
        """Open CFG.data: read and validate its manifest."""
        options = dict(cfg.storage_options or {})
        manifest = read_manifest(cfg.data, options)
        fs, base = fsspec.core.url_to_fs(cfg.data, **options_for(cfg.data, options))
        shard_root = manifest.base_url or cfg.data
        shard_fs, shard_base = fsspec.core.url_to_fs(shard_root, **options_for(shard_root, options))
        return cls(
            root=cfg.data,
            manifest=manifest,
            fs=fs,
            base=base.rstrip("/"),
            shard_fs=shard_fs,
            shard_base=shard_base.rstrip("/"),
            retries=cfg.retries,
            retry_backoff_s=cfg.retry_backoff_s,
            max_read_bytes=cfg.max_read_mb << 20,
            extra=tuple(e.lower() for e in getattr(cfg, "extra_members", ())),
        )

    @property
    def shard_names(self):
        """Shard names by number (a sequence decoded on access, not a list of 10^5 str)."""
        return self.manifest.shards.names

    @property
    def labelled(self) -> bool:
        return self.manifest.labelled

    @property
    def retried(self) -> int:
        """Reads retried after an error so far (by this object, in this process)."""
        return self._retried

    def count_retries(self, n: int) -> None:
        """Add N retries made on this dataset's behalf elsewhere (the reader process)."""
        with self._lock:
            self._retried += n

    @property
    def mapped(self) -> bool:
        """Ranged reads map the shard files (map_local, and shards on a file system of this
        machine: a local disk or a mount, not an object store)."""
        return self.map_local and isinstance(self.shard_fs, LocalFileSystem)

    def shard_path(self, shard: int) -> str:
        """SHARD's file on its storage (a local path where ``mapped``)."""
        return self._shard_file(self.shard_names[shard])

    def _shard_file(self, name: str) -> str:
        return f"{self.shard_base}/{name}"

    def will_need(self, shard: int, indices: np.ndarray) -> None:
        """Have the kernel start reading samples INDICES of mapped SHARD into the page
        cache (posix_fadvise WILLNEED), so that reading them soon does not wait for the
        disk. A hint only: any failure is left for the read itself to report."""
        if not self.mapped or not hasattr(os, "posix_fadvise") or len(indices) == 0:
            return
        try:
            idx = self.index(shard)
            start, stop = (
                (int(idx.begin[indices.min()]), int(idx.end[indices.max()])) if idx else (0, 0)
            )  # no index: the shard is read whole (length 0: to its end)
            fd = os.open(self.shard_path(shard), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except (OSError, ShardReadError, ShardDataError):
            pass

    def _path(self, name: str) -> str:
        """A file beside the manifest (.idx, .labels)."""
        return f"{self.base}/{name}"

    def _retry(self, what: str, fn):
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return fn()
            except TarFormatError as exc:
                raise ShardDataError(
                    redact(f"{what} of dataset {self.root} is damaged: {exc}")
                ) from None
            except _retryable() as exc:
                cause = f"{type(exc).__name__}: {exc}"
                if attempt + 1 == attempts:
                    raise ShardReadError(
                        redact(
                            f"cannot read {what} of dataset {self.root} after {attempts} "
                            f"attempt(s): {cause}"
                        )
                    ) from None
                wait = self.retry_backoff_s * (2**attempt)
                with self._lock:  # read-ahead threads retry concurrently
                    self._retried += 1
                log.warning("reading %s failed (%s); retrying in %.1f s", what, redact(cause), wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _text(self, name: str) -> str:
        raw = self.fs.cat_file(self._path(name))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TarFormatError(f"{name} is not a text file") from None

    def index(self, shard: int) -> ShardIndex | None:
        """The parsed .idx of SHARD (cached), or None if the manifest lists none."""
        with self._lock:
            if shard in self._indexes:
                self._touch(shard)
                return self._indexes[shard]
        info = self.manifest.shards[shard]
        idx = None
        if info.index:

            def load() -> ShardIndex:
                parsed = parse_index(self._text(info.index), source=info.index)
                if len(parsed) != info.samples:
                    raise TarFormatError(
                        f"{info.index} lists {len(parsed)} samples, the manifest {info.samples}"
                    )
                return parsed

            idx = self._retry(f"index {info.index}", load)
        with self._lock:
            self._indexes[shard] = idx
            self._touch(shard)
        return idx

    def _touch(self, shard: int) -> None:
        """SHARD was used (under _lock): drop what is cached of the least recently used
        shards beyond cached_samples (the latest is kept whatever its size)."""
        recent = self._recent
        if shard in recent:
            recent.move_to_end(shard)
            return
        recent[shard] = int(self.manifest.shards.samples[shard])
        self._cached += recent[shard]
        while self._cached > self.cached_samples and len(recent) > 1:
            old, n = recent.popitem(last=False)
            self._cached -= n
            self._indexes.pop(old, None)
            self._labels.pop(old, None)
            self._facts.pop(old, None)

    def sample_labels(self, shard: int) -> tuple[np.ndarray, tuple[str, ...]] | None:
        """(labels, keys) from an adopted shard's .labels file (cached), else None."""
        with self._lock:
            if shard in self._labels:
                self._touch(shard)
                return self._labels[shard]
        info = self.manifest.shards[shard]
        found = None
        if info.labels:

            def load():
                labels, keys = parse_labels(self._text(info.labels), source=info.labels)
                if len(labels) != info.samples:
                    raise TarFormatError(
                        f"{info.labels} lists {len(labels)} samples, the manifest {info.samples}"
                    )
                return labels, keys

            found = self._retry(f"labels {info.labels}", load)
        with self._lock:
            self._labels[shard] = found
            self._touch(shard)
        return found

    def _read(self, name: str, start: int | None = None, stop: int | None = None) -> bytes:
        data = self.shard_fs.cat_file(self._shard_file(name), start=start, end=stop)
        if start is not None and stop is not None and len(data) != stop - start:
            raise TarFormatError(
                f"short read: bytes {start}..{stop} gave {len(data)} bytes (truncated shard?)"
            )
        return data

    def _read_range(self, name: str, start: int, stop: int) -> tuple[Any, int]:
        """Bytes START..STOP of shard NAME: (a buffer, the shard offset of its first byte)."""
        if self.mapped and stop > start:
            try:
                return self._mapping(name, stop), 0
            except OSError:
                # not mappable here (a missing file, a file system without mmap): read it
                self._unmappable.add(name)
        return self._read(name, start, stop), start

    def _mapping(self, name: str, stop: int) -> mmap.mmap:
        """Shard NAME's file mapped whole (kept: MAPPED_FILES), at least STOP bytes long.
        Each read looks at the file first (one stat): a file replaced or cut short since it
        was mapped is mapped afresh, so that a truncated shard is a short read here, not a
        SIGBUS when its missing pages are touched."""
        path = self._shard_file(name)
        st = os.stat(path)
        with self._lock:
            found = self._maps.get(name)
        if found is not None and found[1] == (st.st_ino, st.st_size) and len(found[0]) >= stop:
            return found[0]
        mapping = _map_file(path)
        if len(mapping) < stop:  # mapped bytes past the end would be a SIGBUS, not a short read
            raise TarFormatError(
                f"short read: bytes ..{stop} of a {len(mapping)}-byte file (truncated shard?)"
            )
        with self._lock:
            self._maps.pop(name, None)
            if len(self._maps) >= MAPPED_FILES:
                del self._maps[next(iter(self._maps))]
            self._maps[name] = (mapping, (st.st_ino, st.st_size))
        return mapping

    def _whole(self, info, listed: tuple[str, ...] | None) -> list[RawSample]:
        """Every sample of a shard read whole (no .idx: compressed, or foreign); LISTED
        (an adopted shard's kept keys) picks and orders them."""
        data = self._read(info.name)
        if is_compressed_tar(info.name):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as exc:
                raise TarFormatError(f"not a readable gzip-compressed tar ({exc})") from None
        samples = tar_samples(data, self.extra)
        if listed is not None:
            by_key = {s.key: s for s in samples}
            missing = next((k for k in listed if k not in by_key), None)
            if missing is not None:
                raise TarFormatError(f"has no sample {missing} (changed since it was adopted?)")
            samples = [by_key[k] for k in listed]
        if len(samples) != info.samples:
            raise TarFormatError(f"holds {len(samples)} samples, the manifest says {info.samples}")
        return samples

    def read_samples(self, shard: int, indices: np.ndarray) -> list[RawSample]:
        """Samples INDICES (sorted) of SHARD, in that order, in as few reads as possible."""
        info = self.manifest.shards[shard]
        idx = self.index(shard)
        adopted = self.sample_labels(shard)
        if idx is None:
            return self._whole_samples(shard, indices)
        out = []
        for start, stop, ids in idx.ranges(indices, MERGE_GAP_BYTES, self.max_read_bytes):

            def part(start=start, stop=stop, ids=ids):
                buf, at = self._read_range(info.name, start, stop)
                return slice_samples(buf, at, idx, ids, self.extra)

            out.extend(self._retry(f"shard {info.name} (bytes {start}..{stop})", part))
        return _adopted_labels(out, adopted, indices)

    def _whole_samples(self, shard: int, indices: np.ndarray) -> list[RawSample]:
        info = self.manifest.shards[shard]
        adopted = self.sample_labels(shard)
        listed = adopted[1] if adopted is not None else None
        everything = self._retry(f"shard {info.name}", lambda: self._whole(info, listed))
        return _adopted_labels([everything[i] for i in indices.tolist()], adopted, indices)

    def read_columns(self, shard: int, indices: np.ndarray) -> Columns:
        """Samples INDICES (sorted) of SHARD as pipeline.columns.Columns, every image
        checked (pipeline.sanity) over each read's buffer at once; images lie in the read
        buffers (a local shard's are mappings of its file, where ``mapped``), and where the
        shard is mapped each image's offset in its file is kept (Columns.origin)."""
        info = self.manifest.shards[shard]
        idx = self.index(shard)
        if idx is None:  # read whole: few samples per shard are the rule here, not speed
            raws = self._whole_samples(shard, indices)
            return columns.from_raw(raws, shard, self.labelled, self.extra)
        adopted = self.sample_labels(shard)
        with self._lock:
            facts = self._facts.get(shard)
            if facts is None:
                facts = self._facts[shard] = columns.ShardFacts(len(idx))
            self._touch(shard)
        parts = []
        for start, stop, ids in idx.ranges(indices, MERGE_GAP_BYTES, self.max_read_bytes):

            def part(start=start, stop=stop, ids=ids):
                buf, at = self._read_range(info.name, start, stop)
                labels = adopted[0][ids] if adopted is not None else None
                return columns.from_range(buf, at, idx, ids, shard=shard, facts=facts,
                                          labels=labels, labelled=self.labelled,
                                          extra=self.extra)  # fmt: skip

            parts.append(self._retry(f"shard {info.name} (bytes {start}..{stop})", part))
        out = columns.concat(parts)
        if self.mapped and info.name not in self._unmappable:
            out.origin = out.start  # the buffer read is the whole file (_mapping)
        return out

    def read_bytes(self, shard: int) -> bytes:
        """The whole shard file (benchmarks measure raw read speed with it)."""
        info = self.manifest.shards[shard]
        return self._retry(f"shard {info.name}", lambda: self._read(info.name))
