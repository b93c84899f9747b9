"""The shard reader in a process of its own, handing batches over through shared memory.

Reading a shard (ranged reads, the planned order, the byte checks, retries) and
drawing each sample's augmentation is Python work that holds the GIL; in the
training process it would take turns with the training loop. Here it runs in a
child process that never touches CUDA. The child writes each batch's image bytes
into one of a few shared-memory slots and sends the rest (keys, labels, sizes,
augmentation parameters: a few KB) through a pipe; the parent reads the images
in place, hands them to DALI, and frees the slot. The child never runs more than
``slots`` batches ahead. With ``share_files``, images of local shards are not
copied at all: the child sends where each lies in its shard file, and the parent
hands DALI views of its own read-only mapping of that file (_ShardFiles).

Protocol, all on one duplex pipe (``seq`` numbers the epochs, so that a late
message of an abandoned epoch is never taken for the next one's):

    parent -> child   ("epoch", seq, epoch, plan, start) | ("free", slot)
                      | ("stop", seq) | ("exit",)
    child -> parent   ("batch", seq, slot, segment-or-None, meta) | ("end", seq)
                      | ("stopped", seq) | ("error", seq, exception)

Lifetime: the child ends on ("exit",) or when the pipe closes (the parent died),
unlinking its segments either way; the parent notices a dead child within a
fraction of a second and raises :class:`ReaderProcessError` naming its exit code;
``close()`` unlinks whatever a killed child left behind (segment names carry a
token of this reader).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import mmap
import multiprocessing as mp
import os
import pickle
import secrets
import signal
import threading
import types
import weakref
from collections import deque
from collections.abc import Iterator

import numpy as np

from pipeline import augment, memory
from pipeline.reader import EncodedBatch, encoded_batches

log = logging.getLogger("pipeline")

_SHM_DIR = "/dev/shm"
_MIN_SEGMENT = 1 << 20
_POLL_S = 0.2
# What the child's pipe raises once the parent is gone. Not OSError at large: an OSError
# of reading or of shared memory is an error of the epoch, for the parent to raise.
_PIPE_GONE = (EOFError, ConnectionError)


class ReaderProcessError(RuntimeError):
    """The reader process died or could not start."""


def _context():
    # forkserver: the server imports the reader once; each reader process is forked from
    # that clean process in milliseconds, never from one holding CUDA or DALI's threads.
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torchvision.io", "torchvision.transforms.v2",
                                "pipeline.torch_backend", __name__])  # fmt: skip
    return ctx


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is not responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {signal.SIGKILL: " (the out-of-memory killer sends this)",
                signal.SIGBUS: " (a shard file truncated while it was read?)"}.get(-code, "")  # fmt: skip
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


# -- the child ---------------------------------------------------------------------
class _Child:
    def __init__(self, conn, cfg, token: str, slots: int, share_files: bool) -> None:
        from pipeline.storage import Dataset

        self.conn = conn
        self.cfg = cfg
        self.token = token
        self.share_files = share_files
        self.segments: list[_Segment | None] = [None] * slots
        self.generation = 0
        self.free = set(range(slots))
        self.dataset = Dataset.open(cfg)
        self.dataset.map_local = True  # see Dataset.map_local: this process may die of it

    def serve(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                if msg[0] == "exit":
                    return
                if msg[0] == "free":
                    self.free.add(msg[1])
                elif msg[0] == "epoch":
                    self.epoch(*msg[1:])
                # a "stop" for an epoch that has already ended needs nothing
        except _PIPE_GONE:
            return  # the parent is gone
        finally:
            self.unlink_all()

    def _handle(self, msg, seq: int) -> bool:
        """Apply a message received while an epoch runs; False: stop this epoch."""
        if msg[0] == "free":
            self.free.add(msg[1])
            return True
        if msg[0] == "stop" and msg[1] == seq:
            self.conn.send(("stopped", seq))
            return False
        if msg[0] == "exit":
            raise EOFError
        return True

    def epoch(self, seq: int, epoch: int, plan, start: int) -> None:
        job = types.SimpleNamespace(cfg=self.cfg, plan=plan, start=start, epoch=epoch,
                                    dataset=self.dataset)  # fmt: skip
        # Each image is copied once, by write(), or not at all (share_files)
        source = encoded_batches(job, views=True, origins=self.share_files)
        retried = self.dataset.retried
        try:
            for enc in source:
                while self.conn.poll():
                    if not self._handle(self.conn.recv(), seq):
                        return
                while not self.free:
                    if not self._handle(self.conn.recv(), seq):
                        return
                params = augment.draw(self.cfg, enc.key_hash, epoch, enc.width, enc.height)
                # A slot even for a batch handed over by its origin: the slots are what
                # keeps this process no more than `slots` batches ahead.
                slot = min(self.free)
                self.free.discard(slot)
                segment = offsets = None
                if enc.origin is None:
                    segment, offsets = self.write(slot, enc.images)
                meta = {"step": enc.step, "keys": enc.keys, "offsets": offsets,
                        "origin": enc.origin, "labels": enc.labels, "skipped": enc.skipped,
                        "extra": enc.extra, "width": enc.width, "height": enc.height,
                        "params": params}  # fmt: skip
                retried = self._report_retries(retried)
                self.conn.send(("batch", seq, slot, segment, meta))
            self._report_retries(retried)
            self.conn.send(("end", seq))
        except _PIPE_GONE:
            raise
        except BaseException as exc:  # handed to the parent, which raises it
            self._report_retries(retried)
            self.conn.send(("error", seq, _picklable(exc)))
        finally:
            source.close()

    def _report_retries(self, before: int) -> int:
        now = self.dataset.retried
        if now > before:
            self.conn.send(("retried", now - before))
        return now

    def write(self, slot: int, images: list) -> tuple[str | None, np.ndarray]:
        """Copy IMAGES into SLOT's segment (a bigger one if needed): (new segment's name
        or None, offsets [B+1])."""
        sizes = np.fromiter((len(b) for b in images), dtype=np.int64, count=len(images))
        offsets = np.zeros(len(images) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        total = int(offsets[-1])
        seg = self.segments[slot]
        created = None
        if seg is None or seg.size < total:
            size = max(_MIN_SEGMENT, total + total // 4)
            _check_room(size)
            self.generation += 1
            new = _Segment.create(f"shardflow-{self.token}-{slot}-{self.generation}", size)
            if seg is not None:  # the parent has freed this slot: it reads it no more
                seg.remove()
            self.segments[slot] = seg = new
            created = new.name
        seg.write(images)
        return created, offsets

    def unlink_all(self) -> None:
        for seg in self.segments:
            if seg is not None:
                seg.remove()
        self.segments = [None] * len(self.segments)


class _Segment:
    """A file in /dev/shm, mapped here for writing and by the parent for reading.

    Its pages are allocated when it is made (posix_fallocate): a full /dev/shm is then
    an error naming the cause, where a store into a page it cannot get would kill the
    process with SIGBUS. Images are copied in through the mapping, which costs a third
    of what pwritev does (tmpfs looks each page up per write), GIL and all.
    """

    def __init__(self, name: str, view: memoryview, size: int) -> None:
        self.name, self.view, self.size = name, view, size

    @classmethod
    def create(cls, name: str, size: int) -> _Segment:
        fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            view = memoryview(mmap.mmap(fd, size))
        except BaseException as exc:
            _unlink(name)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise ReaderProcessError(_shm_full(size)) from None
            raise
        finally:
            os.close(fd)
        return cls(name, view, size)

    def write(self, images: list) -> None:
        """IMAGES one after another from the segment's start."""
        view = self.view
        at = 0
        for b in images:
            n = len(b)
            view[at : at + n] = b
            at += n

    def remove(self) -> None:
        mapping = self.view.obj
        self.view.release()
        mapping.close()
        _unlink(self.name)


def _check_room(size: int) -> None:
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return
    if st.f_bavail * st.f_frsize < size:
        raise ReaderProcessError(_shm_full(size, st.f_bavail * st.f_frsize))


def _shm_full(size: int, free: int | None = None) -> str:
    has = f"has {free / 2**20:.0f} MiB free" if free is not None else "is full"
    return (
        f"{_SHM_DIR} {has} and the shard reader needs {size / 2**20:.0f} MiB more for one "
        "batch of image bytes; give the container more shared memory "
        "(docker run --shm-size=2g) or use reader='thread'"
    )


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(_SHM_DIR, name.lstrip("/")))


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception that cannot travel becomes its text
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _LockedConn:
    """The child's end of the pipe: sends from the reader's threads (log lines of retried
    reads) and from its main loop never interleave."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, msg) -> None:
        # Plain pickle: Connection.send's ForkingPickler copies its dispatch table for every
        # message (a batch's is ~15 us here). What it adds, handing over sockets and file
        # descriptors, no message needs; the parent's recv() reads either.
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._conn.send_bytes(data)

    def recv(self):
        return self._conn.recv()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._conn.poll(timeout)


class _Forward(logging.Handler):
    """Log records of the child, re-emitted by the parent's loggers (its handlers, files
    and captures), so a skipped sample is reported where the training run logs."""

    def __init__(self, conn: _LockedConn) -> None:
        super().__init__()
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a parent that is gone reads no logs
            self.conn.send(("log", record.name, record.levelno, record.getMessage()))


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _child_main(conn, cfg, env: dict[str, str], token: str, slots: int, share_files: bool,
                level: int) -> None:  # fmt: skip
    # The parent's environment as it is now (credentials, endpoints): a forkserver's
    # children would otherwise inherit the server's, from when it started.
    os.environ.clear()
    os.environ.update(env)
    memory.keep_freed_memory()  # every read lands in a buffer of its size: warm pages
    memory.collect_rarely()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # SIGTERM (multiprocessing's own clean-up at the parent's exit) unwinds through the
    # finally blocks that unlink the segments.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    conn = _LockedConn(conn)
    root = logging.getLogger()
    root.handlers[:] = [_Forward(conn)]
    root.setLevel(level)
    try:
        child = _Child(conn, cfg, token, slots, share_files)
    except BaseException as exc:
        conn.send(("error", -1, _picklable(exc)))
        return
    conn.send(("ready",))
    child.serve()


# -- the parent --------------------------------------------------------------------
class ReaderProcess:
    """A reader process for one loader: ``batches(job)`` per epoch, ``close()`` at the end.

    SHARE_FILES: images of local shards are handed over as spans of the shard files, read
    here in place (see _ShardFiles), not copied into shared memory; batches then carry no
    ``packed`` buffer. Images of other storage are copied as before.
    """

    def __init__(self, cfg, slots: int, share_files: bool = False) -> None:
        ctx = _context()
        self.token = secrets.token_hex(6)
        self.slots = slots
        self._files = _ShardFiles()
        self._conn, child_conn = ctx.Pipe(duplex=True)
        level = log.getEffectiveLevel()
        self._proc = ctx.Process(
            target=_child_main,
            args=(child_conn, cfg, dict(os.environ), self.token, slots, share_files, level),
            name="shardflow-reader",
            daemon=True,
        )
        self._proc.start()
        child_conn.close()
        self._segments: dict[int, memoryview] = {}
        self._dataset = None  # the parent's Dataset, whose retry count the child adds to
        self._seq = 0
        self._held_over: list[int] = []  # slots of the last epoch's last batches
        self._finalizer = weakref.finalize(self, _shut_down, self._proc, self._conn, self.token,
                                           self._segments)  # fmt: skip
        msg = self._recv()
        if msg[0] == "error":
            self.close()
            raise msg[2]

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _recv(self):
        while True:
            msg = self._recv_any()
            if msg[0] == "log":
                logging.getLogger(msg[1]).log(msg[2], "%s", msg[3])
            elif msg[0] == "retried":  # the epoch report counts the child's retries too
                if self._dataset is not None:
                    self._dataset.count_retries(msg[1])
            else:
                return msg

    def _recv_any(self):
        while not self._conn.poll(_POLL_S):
            if not self._proc.is_alive():
                break
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._gone() from None

    def _send(self, msg) -> None:
        try:
            self._conn.send(msg)
        except OSError:  # a broken pipe: the child died between two messages
            raise self._gone() from None

    def _gone(self) -> ReaderProcessError:
        self._proc.join(timeout=1.0)
        return ReaderProcessError(
            f"the shard reader process (pid {self._proc.pid}) "
            f"{_describe_exit(self._proc.exitcode)}; the loader cannot go on. Look for "
            "its own error above, or for memory pressure on this machine"
        )

    def _segment(self, slot: int, name: str | None) -> memoryview:
        if name is not None:
            # A plain read-only mapping: unmapped when the last view of it goes, however
            # long a caller keeps an image.
            fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                self._segments[slot] = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
            finally:
                os.close(fd)
        return self._segments[slot]

    def batches(
        self, job, keep: int = 1
    ) -> Iterator[tuple[EncodedBatch, augment.BatchParams | None]]:
        """Steps ``job.start..`` of JOB's plan, read by the child, with their augmentation.
        A batch's images stay valid until the consumer asks for the KEEP-th batch after
        it (KEEP < the slots, or the child has nowhere to write the next one), counting
        the batches of the next call: a consumer may still hold the last batches of one
        epoch while it asks for the next (the child then starts reading it at once)."""
        if not 1 <= keep < self.slots:
            raise ValueError(f"keep={keep} needs between 1 and {self.slots - 1} slots held")
        seq = self._start(job)
        done = False
        # the slots of the last batches handed out, this epoch's or the last one's
        held: deque[int] = deque(self._held_over)
        self._held_over = []
        while len(held) >= keep:
            self._send(("free", held.popleft()))
        try:
            while True:
                msg = self._recv()
                if msg[1] != seq:
                    continue
                if msg[0] == "end":
                    # The last batches may still be in the consumer's hands (in DALI) while
                    # it asks for the next epoch: their slots are freed as that epoch's
                    # batches are taken, not here.
                    self._held_over.extend(held)
                    held.clear()
                    done = True
                    return
                if msg[0] == "error":
                    done = True
                    raise msg[2]
                _, _, slot, name, meta = msg
                origin = meta["origin"]
                if origin is not None:
                    images = self._files.images(job.dataset, origin)
                    buf = packed = None
                else:
                    buf = self._segment(slot, name)
                    offsets = meta["offsets"]
                    bounds = offsets.tolist()
                    images = [buf[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
                    span = np.stack([offsets[:-1], np.diff(offsets)], axis=1)
                    packed = (np.frombuffer(buf, dtype=np.uint8)[: bounds[-1]], span)
                enc = EncodedBatch(step=meta["step"], keys=meta["keys"], images=images,
                                   labels=meta["labels"], skipped=meta["skipped"],
                                   extra=meta["extra"], width=meta["width"],
                                   height=meta["height"], packed=packed,
                                   origin=origin)  # fmt: skip
                held.append(slot)
                yield enc, meta["params"]
                del images, enc, buf, packed
                if len(held) == keep:
                    self._send(("free", held.popleft()))
        finally:
            for slot in held:
                self._free(slot)
            if not done:
                self._abandon(seq)

    def _start(self, job) -> int:
        self._seq += 1
        self._dataset = job.dataset
        self._send(("epoch", self._seq, job.epoch, job.plan, job.start))
        return self._seq

    def _free(self, slot: int) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("free", slot))

    def _abandon(self, seq: int) -> None:
        """Stop epoch SEQ in the child and take back every slot it has filled."""
        try:
            self._conn.send(("stop", seq))
            while True:
                msg = self._recv()
                if msg[0] == "batch" and msg[1] == seq:
                    if msg[3] is not None:  # a new segment: the next batch in the slot uses it
                        self._segment(msg[2], msg[3])
                    self._free(msg[2])
                elif msg[0] in ("end", "stopped", "error") and msg[1] == seq:
                    return
        except (OSError, ReaderProcessError):
            return  # a dead child stops nothing; close() cleans up after it

    def close(self) -> None:
        self._finalizer()
        self._files.clear()


# A mapping is dropped from the cache after this many others (a view of it keeps it).
_OPEN_FILES = 64


class _ShardFiles:
    """The shard files that batches handed over by origin point into, mapped read-only
    here, each whole and once: an image is a view of the page cache, which DALI decodes
    in place (no copy in either process).

    Shards are written whole and renamed into place, which leaves an existing mapping of
    the file it replaces intact; only a shard truncated in place while it is read would
    stop this process (SIGBUS), as it would a process running DALI's own file reader,
    which maps shards too.
    """

    def __init__(self) -> None:
        self._maps: dict[int, memoryview] = {}

    def images(self, dataset, origin: np.ndarray) -> list[memoryview]:
        """The images at ORIGIN ([B, 3]: shard, offset, size) of DATASET's shards."""
        maps = self._maps
        out = []
        for shard, at, n in origin.tolist():
            m = maps.get(shard)
            if m is None:
                m = self._map(dataset, shard)
            if at + n > len(m):
                from pipeline.storage import ShardDataError

                raise ShardDataError(
                    f"shard {dataset.shard_names[shard]} has {len(m)} bytes, fewer than when it "
                    "was read: it was changed in place during training"
                )
            out.append(m[at : at + n])
        return out

    def _map(self, dataset, shard: int) -> memoryview:
        from pipeline.storage import ShardReadError

        path = dataset.shard_path(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                view = memoryview(mmap.mmap(fd, 0, prot=mmap.PROT_READ))
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:  # ValueError: an empty file
            raise ShardReadError(
                f"cannot map shard {path} that the reader process read ({exc}); if its file "
                "system does not allow mmap, use reader='thread'"
            ) from None
        if len(self._maps) >= _OPEN_FILES:
            del self._maps[next(iter(self._maps))]
        self._maps[shard] = view
        return view

    def clear(self) -> None:
        self._maps.clear()


def _shut_down(proc, conn, token: str, segments: dict) -> None:
    """Stop the reader process and remove its segments (close(), or this process's exit
    for a loader never closed)."""
    if proc.is_alive():
        with contextlib.suppress(OSError):
            conn.send(("exit",))
        proc.join(timeout=5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5.0)
    conn.close()
    segments.clear()
    for path in glob.glob(os.path.join(_SHM_DIR, f"shardflow-{token}-*")):
        _unlink(os.path.basename(path))  # what a killed child could not unlink
