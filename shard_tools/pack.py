"""``shard pack``: list the input, validate it in worker processes, write shards.

Workers (processes) read, validate and re-encode batches of inputs; results
come back in input order and one writer in this process assigns keys, cuts
shards and writes them. Keys and shard boundaries therefore depend only on
the input order and the options, never on the number or timing of workers:
the output is byte-identical for any ``--workers``, after ``--resume`` and on
any storage. Only a bounded number of batches is in flight, so memory does not
grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from PIL import Image

from shard_tools import __version__, labels, rejects, resume, validate
from shard_tools.config import PackConfig
from shard_tools.format import (
    MANIFEST_NAME,
    REJECTED_NAME,
    Manifest,
    ShardInfo,
    index_name,
    shard_name,
    write_manifest,
)
from shard_tools.sources import MANIFEST_SUFFIXES, Item, Source, describe, list_source, select
from shard_tools.storage import Destination
from shard_tools.tarwrite import ChangedFileError, ShardTarWriter

BATCH = 32  # inputs per worker task: big enough to amortise IPC for tiny images
IN_FLIGHT_PER_WORKER = 4
# Local shards are flushed to disk as they grow (see ShardTarWriter), not all at the end.
SYNC_EVERY = 8 << 20


class PackError(Exception):
    """The pack cannot proceed (bad destination state, --strict rejection, ...)."""


@dataclass(frozen=True, kw_only=True)
class PackResult:
    """What a finished pack wrote."""

    manifest: Manifest
    dest: str
    rejected: int
    seconds: float
    resumed_shards: int = 0
    processed: int = 0  # inputs processed in this run (excludes resumed shards)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "dest": self.dest,
            "samples": m.samples,
            "shards": len(m.shards),
            "bytes": m.bytes,
            "rejected": self.rejected,
            "classes": m.num_classes,
            "seconds": round(self.seconds, 3),
            "img_per_s": round(self.processed / self.seconds, 1) if self.seconds > 0 else None,
            "resumed_shards": self.resumed_shards,
        }

    def summary_line(self) -> str:
        s = self.summary()
        line = (
            f"packed {s['samples']:,} samples into {s['shards']} shards ({s['bytes'] / 1e6:,.1f} MB) "
            f"at {s['dest']} in {s['seconds']:.1f} s"
        )
        if s["img_per_s"]:
            line += f" ({s['img_per_s']:,.0f} img/s)"
        if s["resumed_shards"]:
            line += f"; {s['resumed_shards']} shards kept from the interrupted run"
        line += f"; rejected {s['rejected']:,}"
        if s["rejected"]:
            line += f" (see {REJECTED_NAME})"
        return line


def worker_context() -> multiprocessing.context.BaseContext:
    """Where worker processes come from.

    Not plain fork: the parent may run fsspec's I/O thread (s3fs) or native
    thread pools, and a child forked while another thread holds a lock can
    hang. A fork server is a clean single-threaded process that imports the
    worker code once; later pools in the same process start in milliseconds
    (spawn would re-import PIL/numpy/fsspec in every worker of every pack).
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["shard_tools.validate"])
    return ctx


def start_pool(workers: int) -> ProcessPoolExecutor | None:
    """The worker processes of a pack, started now (None for 1 worker: in-process).

    Started before the input is listed, so that the fork server's start-up (a
    fresh process imports PIL and fsspec: ~0.2 s) and the workers' own
    overlap with the listing instead of following it.
    """
    if workers <= 1:
        return None
    ex = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=worker_context(),
        initializer=validate.init_worker,
        initargs=(dict(os.environ), os.getpid()),
    )
    for _ in range(workers):
        ex.submit(validate.close_handles)  # spawns the workers; they initialise meanwhile
    return ex


def ordered_results(
    items: list[Item],
    start: int,
    opts: validate.WorkerOptions,
    workers: int,
    base: int = 0,
    pool: ProcessPoolExecutor | None = None,
) -> Iterator[validate.Result]:
    """Process ITEMS[START:] and yield results in input order, with bounded memory.

    ITEMS[0] is input position BASE (a chunk of a larger input): results carry
    global positions, which become the sample keys. POOL (from ``start_pool``)
    is used and shut down; without it one is started here.
    """
    if workers <= 1:
        # In this process: change PIL's global settings only while packing.
        previous = validate.configure_pil()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                for pos in range(start, len(items)):
                    yield validate.process(base + pos, items[pos], opts)
        finally:
            validate.close_handles()
            validate.restore_pil(previous)
        return
    ex = pool or start_pool(workers)
    pending: deque = deque()
    nxt = start
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < workers * IN_FLIGHT_PER_WORKER:
                pending.append(
                    ex.submit(validate.process_batch, base + nxt, items[nxt : nxt + BATCH], opts)
                )
                nxt += BATCH
            yield from pending.popleft().result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


class _ShardSink:
    """One shard being written: its atomic file, its tar writer, its journal data."""

    def __init__(self, dest: Destination, index: int) -> None:
        self.name = shard_name(index)
        self.index_name = index_name(self.name)
        self._cm = dest.atomic_writer(self.name)
        self.tar = ShardTarWriter(
            self._cm.__enter__(), sync_every=SYNC_EVERY if dest.is_local else None
        )
        self.rejected: list[tuple[str, str]] = []
        self.class_counts: dict[int, int] = {}

    def commit(
        self, dest: Destination, input_end: int
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Close the tar; return its journal entry and the function that publishes it.

        Publishing (flush + fsync + rename, or the S3 upload's completion, then
        the index, then the journal entry, in that order) runs on the
        committer thread, so the writer goes on with the next shard meanwhile.
        """
        idx = self.tar.finish().encode("ascii")
        entry = {
            "name": self.name,
            "samples": self.tar.samples,
            "bytes": self.tar.bytes_written,
            "sha256": self.tar.sha256,
            "index": self.index_name,
            "index_sha256": hashlib.sha256(idx).hexdigest(),
            "first_key": self.tar.first_key,
            "last_key": self.tar.last_key,
            "input_end": input_end,
            "rejected": self.rejected,
            "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
        }

        def publish() -> None:
            self._cm.__exit__(None, None, None)
            dest.write_bytes(self.index_name, idx)
            resume.record(dest, entry)

        return entry, publish

    def abort(self, exc: BaseException) -> None:
        self.tar.close()  # its writer thread must stop before the file is discarded
        self._cm.__exit__(type(exc), exc, exc.__traceback__)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # A pseudo-terminal may report 0 columns, which would draw an empty bar.
    ncols = shutil.get_terminal_size().columns or 100
    return tqdm(
        total=total, initial=initial, unit="img", ncols=ncols, file=sys.stderr, smoothing=0.1
    )


def _fingerprint(config: PackConfig, source: Source) -> dict[str, Any]:
    return {
        "tool_version": __version__,
        "options": config.recorded_options(),
        "classes": source.classes,
        "inputs": len(source.items),
        "listing_sha256": hashlib.sha256(describe(source.items)).hexdigest(),
    }


def pack(
    config: PackConfig, *, storage_options: dict[str, Any] | None = None, progress: bool = True
) -> PackResult:
    """Pack CONFIG.src into shards at CONFIG.dest; see the module doc for the guarantees.

    Raises PackError, resume.ResumeError or sources.SourceError with a
    one-line reason when the pack cannot be done. ``--executor ray`` runs in
    ``ray_executor`` (which reuses this module's listing, writer and merge).
    """
    if config.executor == "ray":
        from shard_tools import ray_executor

        return ray_executor.pack(config, storage_options=storage_options, progress=progress)
    t0 = time.perf_counter()
    pool = start_pool(config.num_workers)
    source = None
    try:
        dest, source = prepare(config, storage_options)
        done = resume.begin(dest, _fingerprint(config, source), resume=config.resume)
        tail: list[tuple[str, str]] = []
        entries = done + _write_shards(
            config, source, dest, done, storage_options, progress, tail, pool=pool
        )
        return _finish(config, source, dest, entries, tail, len(done), time.perf_counter() - t0)
    finally:
        if pool is not None:  # already shut down unless something failed on the way
            pool.shutdown(wait=True, cancel_futures=True)
        if source is not None:
            source.close()  # decompressed copies of .tar.gz inputs


def prepare(
    config: PackConfig, storage_options: dict[str, Any] | None
) -> tuple[Destination, Source]:
    """Check that DEST holds no finished dataset; list and select the input (pack order)."""
    dest = Destination(config.dest, storage_options)
    if dest.exists(MANIFEST_NAME):
        raise PackError(
            f"{config.dest} already holds a finished dataset ({MANIFEST_NAME}); choose another DEST"
        )
    kind_table = isinstance(config.src, str) and config.src.lower().endswith(MANIFEST_SUFFIXES)
    try:
        spec = labels.parse_spec(config.label or None, unlabelled=config.unlabelled,
                                 classes_from=config.classes_from, table=kind_table,
                                 storage_options=storage_options)  # fmt: skip
    except ValueError as exc:
        raise PackError(str(exc)) from None
    listed = list_source(config.src, storage_options, spec)
    source = select(
        listed,
        classes=config.classes,
        fraction=config.fraction,
        shuffle=config.shuffle,
        seed=config.seed,
    )
    if config.strict and source.rejected:
        path, reason = source.rejected[0]
        source.close()
        raise PackError(
            f"--strict: rejected {path}: {reason} (and {len(source.rejected) - 1} more)"
        )
    try:  # before anything is written: most rejections are known from the listing
        rejects.check(len(source.items), source.rejected, config.max_reject_fraction,
                      source.hints, what="pack", error=PackError)  # fmt: skip
    except PackError:
        source.close()
        raise
    return dest, source


def _write_shards(
    config: PackConfig,
    source: Source,
    dest: Destination,
    done: list[dict[str, Any]],
    storage_options: dict[str, Any] | None,
    progress: bool,
    tail_rejected: list[tuple[str, str]],
    base: int = 0,
    pool: ProcessPoolExecutor | None = None,
) -> list[dict[str, Any]]:
    """Write the shards after DONE; return their journal entries in order.

    Rejections with no shard to carry them (every remaining input rejected)
    go to TAIL_REJECTED. ``source.items[0]`` is input position BASE (non-zero
    when one chunk of a larger input is packed): keys and ``input_end`` are
    global positions.
    """
    start = done[-1]["input_end"] - base if done else 0
    names = {v: k for k, v in source.classes.items()}
    opts = validate.WorkerOptions(
        class_names=tuple(names[i] for i in range(len(names))),
        validate=config.validate,
        max_pixels=config.max_pixels,
        resize_max_side=config.resize_max_side,
        quality=config.quality,
        image_format=config.image_format,
        storage_options=storage_options,
    )
    bar = _progress_bar(len(source.items), start, progress)
    entries: list[dict[str, Any]] = []
    published: list[Future] = []
    # One committer thread: shards are published strictly in order.
    committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-commit")
    shard: _ShardSink | None = None
    written_bytes = 0

    def commit(input_end: int) -> None:
        nonlocal written_bytes
        entry, publish = shard.commit(dest, input_end)
        entries.append(entry)
        published.append(committer.submit(publish))
        written_bytes += entry["bytes"]
        while published and published[0].done():
            published.pop(0).result()  # surface a failed publish early

    try:
        for n, (pos, label, payload) in enumerate(
            ordered_results(source.items, start, opts, config.num_workers, base, pool)
        ):
            if bar is not None:
                bar.update(1)
                if n % 256 == 0:
                    bar.set_postfix_str(f"{written_bytes / 1e6:,.0f} MB", refresh=False)
            if label is None:
                if config.strict:
                    raise PackError(
                        f"--strict: rejected {source.items[pos - base].source}: {payload}"
                    )
                if shard is None:
                    shard = _ShardSink(dest, len(done) + len(entries))
                shard.rejected.append((source.items[pos - base].source, payload))
                continue
            if (
                shard is not None
                and shard.tar.samples
                and (
                    shard.tar.samples >= config.max_count
                    or shard.tar.size_if_added(payload) > config.max_bytes
                )
            ):
                commit(input_end=pos)
                shard = None
            if shard is None:
                shard = _ShardSink(dest, len(done) + len(entries))
            shard.tar.add_chunk(payload)
            shard.class_counts[label] = shard.class_counts.get(label, 0) + 1
        if shard is not None:
            if shard.tar.samples:
                commit(input_end=base + len(source.items))
            else:
                # Only rejections since the last shard: no shard file; the
                # rejections still go to rejected.jsonl.
                shard.abort(RuntimeError("empty shard"))
                tail_rejected.extend(shard.rejected)
            shard = None
    except BaseException as exc:
        if shard is not None:
            shard.abort(exc)
        if isinstance(exc, ChangedFileError):
            raise PackError(f"{exc}; rerun with --resume once the input is stable") from None
        if isinstance(exc, BrokenProcessPool):
            raise PackError(
                "a worker process died (killed, or out of memory?); rerun with --resume"
            ) from None
        raise
    finally:
        # Shards already handed over are whole: let their publishing finish
        # (so the journal matches the files) before returning or raising.
        committer.shutdown(wait=True)
        if bar is not None:
            bar.close()
    for future in published:
        future.result()
    return entries


def _finish(
    config: PackConfig,
    source: Source,
    dest: Destination,
    entries: list[dict[str, Any]],
    tail_rejected: list[tuple[str, str]],
    resumed: int,
    seconds: float,
) -> PackResult:
    rejected = list(source.rejected)
    for e in entries:
        rejected.extend(tuple(r) for r in e["rejected"])
    rejected.extend(tail_rejected)
    kept = sum(e["samples"] for e in entries)
    rejects.check(kept, rejected, config.max_reject_fraction, source.hints, what="pack",
                  error=PackError)  # fmt: skip
    lines = "".join(
        json.dumps({"path": p, "reason": r}, sort_keys=True, ensure_ascii=False) + "\n"
        for p, r in rejected
    )
    dest.write_bytes(REJECTED_NAME, lines.encode("utf-8"))
    names = {v: k for k, v in source.classes.items()}
    counts = {name: 0 for name in source.classes}
    for e in entries:
        for label, n in e["class_counts"].items():
            if int(label) >= 0:  # unlabelled samples (-1) belong to no class
                counts[names[int(label)]] += n
    shards = tuple(
        ShardInfo(
            name=e["name"],
            samples=e["samples"],
            bytes=e["bytes"],
            sha256=e["sha256"],
            index=e["index"],
            first_key=e["first_key"],
            last_key=e["last_key"],
        )
        for e in entries
    )
    manifest = Manifest(
        shards=shards,
        classes=dict(source.classes),
        samples=sum(s.samples for s in shards),
        bytes=sum(s.bytes for s in shards),
        rejected=len(rejected),
        class_counts=counts,
        options=config.recorded_options(),
        tool_version=__version__,
        labelled=source.labelled,
    )
    # The manifest is the commit marker: written last, after every shard,
    # index and the rejected list are in place.
    write_manifest(dest.write_bytes, manifest)
    resume.clear(dest)
    processed = len(source.items) - (entries[resumed - 1]["input_end"] if resumed else 0)
    return PackResult(
        manifest=manifest,
        dest=config.dest,
        rejected=len(rejected),
        seconds=seconds,
        resumed_shards=resumed,
        processed=processed,
    )
