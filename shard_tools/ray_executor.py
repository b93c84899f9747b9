"""``shard pack --executor ray``: pack chunks of the input as Ray tasks on a cluster.

The driver lists (and shuffles/selects) the input as a local pack does, cuts
the list into chunks of ``PackConfig.chunk_size`` consecutive inputs and runs
one Ray task per chunk. A task packs its chunk with the local writer
(``pack._write_shards``: same validation, same deterministic tar and .idx
bytes, same atomic publish and per-shard journal), writing straight to
``DEST/.chunks/chunk-CCCCCC/shard-NNNNNN.tar`` in DEST's own storage. Keys
are global input positions, so they stay unique and sort in pack order.

Shard numbering: how many shards a chunk makes is known only once it is
packed (``--max-bytes`` and rejections decide), so a chunk cannot know its
final numbers in advance. Reserving a range per chunk would leave gaps and,
for large inputs, overflow the six digits of ``shard-NNNNNN.tar``. Instead the
driver gives the shards of chunk 0, 1, 2, ... consecutive final numbers as
soon as every earlier chunk is done, and moves them into place: an
``os.replace`` on a local or shared file system (free), a server-side copy
and delete on S3 (no bytes pass through the driver; the object appears
whole, as any S3 write). The result is byte-identical across runs for a given
chunk size. Each chunk ends its last shard early, so the shards differ from a
local pack's unless the chunk size is a multiple of ``--max-count``, no input
is rejected and ``--max-bytes`` never decides (then they are identical).

Resume: each chunk has its own journal (``resume``) under its folder, and a
finished chunk leaves ``DEST/.chunks/done/chunk-CCCCCC.json`` with its journal
entries. ``--resume`` skips chunks with that marker, continues the others
from their journals, redoes any move not done and writes the manifest, last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from shard_tools import pack as packing
from shard_tools import resume
from shard_tools.config import PackConfig
from shard_tools.format import ManifestError, index_name, is_compressed_tar, join_url, shard_name
from shard_tools.resume import ResumeError
from shard_tools.sources import Item, Source, SourceError, TarRef, describe
from shard_tools.storage import Destination

CHUNKS_DIR = ".chunks"
DONE_DIR = f"{CHUNKS_DIR}/done"
INSTALL_HINT = "pip install 'shardflow[ray]'"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkSpec:
    """One Ray task's work: inputs ``base .. base + len(items) - 1`` of the pack."""

    index: int
    base: int
    items: list[Item]
    classes: dict[str, int]
    config: PackConfig
    dest_url: str


def chunk_dir(index: int) -> str:
    return f"{CHUNKS_DIR}/chunk-{index:06d}"


def done_name(index: int) -> str:
    return f"{DONE_DIR}/chunk-{index:06d}.json"


def _absolute(item: Item) -> Item:
    """ITEM with a relative local path made absolute: tasks may run in another directory."""
    ref = item.ref
    if isinstance(ref, TarRef):
        if "://" not in ref.url and not os.path.isabs(ref.url):
            return item._replace(ref=ref._replace(url=os.path.abspath(ref.url)))
    elif "://" not in ref and not os.path.isabs(ref):
        return item._replace(ref=os.path.abspath(ref))
    return item


def _import_ray():
    try:
        import ray
    except ImportError:
        raise packing.PackError(f"--executor ray needs Ray: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast on an address nothing listens on: ray.init would retry for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise packing.PackError(
            f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise packing.PackError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head`, or check --ray-address"
        ) from None


@contextlib.contextmanager
def ray_session(config: PackConfig) -> Iterator[Any]:
    """Connect to --ray-address, or start a local Ray with --workers CPUs; yield the module.

    A Ray already initialised in this process is used as it is (and left
    running). Otherwise the connection is shut down at the end.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if config.ray_address:
            _check_reachable(config.ray_address)
            ray.init(address=config.ray_address, **quiet)
        else:
            # A packing tool should not report usage statistics by default.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(
                address="local",
                num_cpus=config.num_workers,
                include_dashboard=False,
                **quiet,
            )
    except packing.PackError:
        raise
    except Exception as exc:
        where = config.ray_address or "a local Ray instance"
        raise packing.PackError(f"cannot start or join {where}: {_first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _forwarded_env() -> dict[str, str]:
    """The driver's AWS_* variables: tasks on other machines use the same credentials.

    They travel as task arguments inside Ray (never logged or printed), like
    the storage options.
    """
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pack_chunk(
    spec: ChunkSpec, storage_options: dict[str, Any] | None, env: dict[str, str]
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Pack one chunk into its folder under DEST (runs as a Ray task).

    Returns the journal entries of its shards (chunk-local names) and the
    rejections after its last shard; also writes them to the chunk's done
    marker, so a driver that dies after this task still finds the work.
    """
    with _environment(env):
        dest = Destination(spec.dest_url, storage_options)
        cdest = Destination(join_url(dest.url, chunk_dir(spec.index)), storage_options)
        fingerprint = {
            "chunk": spec.index,
            "base": spec.base,
            "inputs": len(spec.items),
            "listing_sha256": hashlib.sha256(describe(spec.items)).hexdigest(),
            "options": spec.config.recorded_options(),
        }
        # Always resume: the driver already refused a fresh pack into a used
        # DEST, and journal entries are checked against the shards' hashes.
        done = resume.begin(cdest, fingerprint, resume=True)
        tail: list[tuple[str, str]] = []
        source = Source(classes=spec.classes, items=spec.items)
        # One Ray task is one CPU: pack in this process (parallelism comes from tasks).
        config = dataclasses.replace(spec.config, workers=1)
        entries = done + packing._write_shards(
            config, source, cdest, done, storage_options, False, tail, base=spec.base
        )
        marker = {"entries": entries, "tail_rejected": tail}
        dest.write_bytes(done_name(spec.index), json.dumps(marker, sort_keys=True).encode())
    return entries, tail


def _move(dest: Destination, src: str, dst: str, size: int | None) -> None:
    """Move DEST/SRC to DEST/DST; if SRC is gone, DST must be there already (resume)."""
    if dest.is_local:
        try:
            os.replace(dest.path(src), dest.path(dst))
            return
        except FileNotFoundError:
            pass
    elif dest.fs.exists(dest.path(src)):
        dest.fs.mv(dest.path(src), dest.path(dst))  # s3fs: server-side copy, then delete
        return
    if not dest.exists(dst) or (size is not None and dest.size(dst) != size):
        raise packing.PackError(
            f"{src} is missing and {dst} is not in place; pack again into an empty destination"
        )


def _publish(
    dest: Destination, index: int, entries: list[dict[str, Any]], first_number: int
) -> list[dict[str, Any]]:
    """Give chunk INDEX's shards their final names; return the renamed entries."""
    final = []
    for k, entry in enumerate(entries):
        name = shard_name(first_number + k)
        idx_name = index_name(name)
        # The index first: a shard under its final name always has its index.
        _move(dest, f"{chunk_dir(index)}/{entry['index']}", idx_name, None)
        _move(dest, f"{chunk_dir(index)}/{entry['name']}", name, entry["bytes"])
        final.append({**entry, "name": name, "index": idx_name})
    return final


def _get(ray: Any, ref: Any, index: int) -> Any:
    """A task's result, with its failure turned into a one-line error."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, packing.PackError | ResumeError | SourceError | ManifestError):
            raise cause from None
        raise packing.PackError(
            f"chunk {index} failed: {_first_line(cause or exc)}; rerun with --resume"
        ) from None
    except ray.exceptions.RayError as exc:
        raise packing.PackError(
            f"chunk {index} was lost ({_first_line(exc)}); rerun with --resume"
        ) from None


ChunkOutcome = tuple[list[dict[str, Any]], list[tuple[str, str]], bool]


def _chunk_outcomes(
    ray: Any,
    config: PackConfig,
    source: Source,
    dest: Destination,
    finished: set[int],
    storage_options: dict[str, Any] | None,
    on_done: Callable[[int], Any],
) -> Iterator[tuple[int, ChunkOutcome]]:
    """Yield (chunk, (entries, tail rejections, kept)) for every chunk, in chunk order.

    Finished chunks (with a done marker) are read back; the others run as Ray
    tasks, a bounded number at a time, in any order. ON_DONE(n_inputs) is
    called as each task finishes. On any error, the tasks still running are
    cancelled.
    """
    size = config.chunk_size
    n_chunks = -(-len(source.items) // size)
    todo = deque(c for c in range(n_chunks) if c not in finished)
    remote = ray.remote(num_cpus=1)(pack_chunk)
    # Bounded submission: a billion inputs must not all sit in the object store.
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    env = _forwarded_env()
    dest_url = dest.root if dest.is_local else dest.url
    pending: dict[Any, int] = {}
    results: dict[int, tuple[list[dict[str, Any]], list[tuple[str, str]]]] = {}
    try:
        for c in range(n_chunks):
            if c in finished:
                marker = json.loads(dest.read_bytes(done_name(c)))
                yield c, (marker["entries"], marker["tail_rejected"], True)
                continue
            while c not in results:
                while todo and len(pending) < window:
                    t = todo.popleft()
                    spec = ChunkSpec(
                        index=t,
                        base=t * size,
                        items=[_absolute(i) for i in source.items[t * size : (t + 1) * size]],
                        classes=source.classes,
                        config=config,
                        dest_url=dest_url,
                    )
                    pending[remote.remote(spec, storage_options, env)] = t
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    t = pending.pop(ref)
                    results[t] = _get(ray, ref, t)
                    on_done(len(source.items[t * size : (t + 1) * size]))
            yield c, (*results.pop(c), False)
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def pack(
    config: PackConfig, *, storage_options: dict[str, Any] | None = None, progress: bool = True
) -> packing.PackResult:
    """``pack.pack`` for ``config.executor == "ray"``; see the module doc."""
    srcs = config.src if isinstance(config.src, tuple) else (config.src,)
    if any(is_compressed_tar(s) for s in srcs):
        raise packing.PackError(
            "--executor ray reads .tar.gz inputs only through a local decompressed copy, which "
            "the cluster's workers cannot see: decompress them first, or pack without Ray"
        )
    t0 = time.perf_counter()  # Ray's start-up counts: it is part of the wait
    with ray_session(config) as ray:
        dest, source = packing.prepare(config, storage_options)
        resume.begin(dest, packing._fingerprint(config, source), resume=config.resume)
        size, total = config.chunk_size, len(source.items)
        finished = {
            int(n.removeprefix("chunk-").removesuffix(".json"))
            for n in dest.names(DONE_DIR)
            if n.startswith("chunk-") and n.endswith(".json")
        }
        kept_inputs = sum(min(size, total - c * size) for c in finished if c * size < total)
        bar = packing._progress_bar(total, kept_inputs, progress)
        entries: list[dict[str, Any]] = []
        carry: list[tuple[str, str]] = []
        kept_shards = 0
        outcomes = _chunk_outcomes(
            ray,
            config,
            source,
            dest,
            finished,
            storage_options,
            bar.update if bar is not None else lambda n: None,
        )
        # closing(): a failed move cancels the running tasks now, not at garbage collection.
        try:
            with contextlib.closing(outcomes):
                for c, (chunk_entries, tail, kept) in outcomes:
                    published = _publish(dest, c, chunk_entries, len(entries))
                    kept_shards += len(published) if kept else 0
                    # Rejections after a chunk's last shard come before the next shard's.
                    for e in published:
                        e["rejected"] = carry + [tuple(r) for r in e["rejected"]]
                        carry = []
                    entries.extend(published)
                    carry.extend(tuple(r) for r in tail)
        finally:
            if bar is not None:
                bar.close()
        result = packing._finish(config, source, dest, entries, carry, 0, time.perf_counter() - t0)
        dest.remove(CHUNKS_DIR)
    return dataclasses.replace(result, resumed_shards=kept_shards, processed=total - kept_inputs)
