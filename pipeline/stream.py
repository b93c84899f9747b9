"""A feeder thread's queue of finished batches, run on from one epoch into the next.

A training loop takes an epoch's batches, then asks for the next epoch from its
start. A feeder started afresh per epoch leaves the training thread waiting at
every epoch's start (the queue empty while the first batch is read, decoded and
converted) and the decoder's threads idle while the last batches drain. So the
stream goes on: once it has taken an epoch's last input it plans the epoch most
likely next (``Job.following``, in the feeder thread) and feeds that, until
``depth`` finished batches of it wait in the queue. If the loop then asks for
exactly that job it gets them at once; anything else (another epoch, a resume, a
loop that left an epoch early) stops the stream, and what it made is dropped.

The feeder plans one job beyond the one the loop has started, never more: the
loop's own Job of that epoch (not the feeder's) says what follows it. A loop that
does not come back for that job within ``AHEAD_FOR_S`` (training is over, or the
loader was dropped without ``close()``) finds the stream stopped: its thread,
reads and finished batches are not kept for a consumer that may never come.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("pipeline")

_END = object()
_POLL_S = 0.1
# How long finished batches of the next job wait for the consumer to start that job.
AHEAD_FOR_S = 30.0
# How long the feeder lets a consumer's step run before it works on the next batch, when it
# is ahead (see _put). A proxy step of 4 ms GIL-held Python + 14.5 ms GIL-free, fed a batch
# of ImageNet photos: 0.95x of its rate without data with no pause, 0.97x with a bare
# yield of the GIL, 0.99x with 1 ms (benchmarks feed, neighbour).
_STEP_BACK_S = 0.001


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class FeedStream:
    """Batches of JOB and of the jobs that follow it, made by one feeder thread.

    INPUTS(job): the job's inputs, in order (the shard reader's batches). FINISH(inputs):
    the finished batches of an iterator of inputs, one per input, in order (the decoder,
    which keeps several inputs in flight, across the end of a job too). DEPTH: finished
    batches queued ahead of the consumer.
    """

    def __init__(self, job, inputs: Callable, finish: Callable, depth: int,
                 name: str = "feeder") -> None:  # fmt: skip
        self._inputs = inputs
        self._finish = finish
        self._ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._started = 0  # jobs the consumer has started taking (JOB: the first)
        self._current = job  # the consumer's Job it takes (or took) batches of
        self._planned = None  # the job the feeder went on with after the current one
        self._whole = job.plan.steps == job.start  # the current job's batches are all taken
        self._whole_at = time.monotonic()  # when they were
        self._idle = threading.Event()  # the feeder waits for room in the queue
        self._ended = False
        self._thread = threading.Thread(target=self._feed, args=(job,), name=name, daemon=True)
        self._thread.start()

    # -- the feeder thread -------------------------------------------------------------
    def _feed(self, job) -> None:
        chain = self._chain(job)
        try:
            # Closed in this order: the finishing stage first (what is in flight in the
            # decoder is collected), then the inputs (their buffers are released).
            with contextlib.closing(chain), contextlib.closing(self._finish(chain)) as finished:
                for item in finished:
                    if not self._put(item):
                        return
            self._put(_END)
        except BaseException as exc:  # the consumer re-raises it in the job it belongs to
            self._put(_Failure(exc))
        finally:
            if self._stop.is_set():  # nobody takes them: release them (device memory) now
                with contextlib.suppress(queue.Empty):
                    while True:
                        self._ready.get_nowait()
            self._ended = True

    def _chain(self, job) -> Iterator:
        n = 0
        while True:
            yield from self._inputs(job)
            job = self._following(n)
            if job is None:
                return
            n += 1

    def _following(self, n: int):
        """The job after the Nth one, planned once the consumer has started the Nth
        (its own Job knows what follows); None: the stream ends there."""
        with self._cond:
            while self._started < n and not self._stop.is_set() and not self._abandoned():
                self._idle.set()  # a whole job ahead: nothing more to do until it starts
                self._cond.wait(_POLL_S)
            self._idle.clear()
            if self._stop.is_set() or self._started != n:
                return None
            current = self._current
        if current.following is None:
            return None
        try:
            nxt = current.following()
        except Exception as exc:  # noqa: BLE001 - going on early only saves time
            log.warning("could not plan epoch %d ahead (%s); it is planned when it starts",
                        current.epoch + 1, exc)  # fmt: skip
            return None
        with self._cond:
            self._planned = nxt
        return nxt

    def _put(self, item) -> bool:
        try:
            self._ready.put_nowait(item)
            return True
        except queue.Full:
            pass
        self._idle.set()
        while not self._stop.is_set():  # ahead of the consumer: wait for it to take one
            try:
                self._ready.put(item, timeout=_POLL_S)
            except queue.Full:
                with self._cond:
                    self._abandoned()
                continue
            self._idle.clear()
            # The consumer has just taken a batch and starts its step: the Python part of
            # a training step wants the GIL now, and this thread, woken by that very take,
            # would compete for it with its own Python work for the next batch. Stepping
            # back lets that work land later, in the step's GIL-free part (a GPU step's
            # wait). Free for the feed: the queue is full again, a step's worth ahead.
            time.sleep(_STEP_BACK_S)
            return True
        return False

    def _abandoned(self) -> bool:
        """(Under the lock.) The consumer took the current job whole and has not started
        the next one for AHEAD_FOR_S: stop (True)."""
        if self._whole and time.monotonic() - self._whole_at > AHEAD_FOR_S:
            self._stop.set()
        return self._stop.is_set()

    # -- the consumer ------------------------------------------------------------------
    def accept(self, job) -> bool:
        """Take JOB's batches from this stream if they are the ones it makes next: the
        job it planned after the one taken last, from its start, that one taken whole,
        and the stream still running. Then take(JOB) gives them."""
        with self._cond:
            planned = self._planned
            if self._stop.is_set() or not (
                self._whole and planned is not None and job.start == 0
                and job.epoch == planned.epoch and job.plan is planned.plan
            ):  # fmt: skip
                return False
            self._started += 1
            self._current, self._planned = job, None
            self._whole = job.plan.steps == job.start
            self._whole_at = time.monotonic()
            self._cond.notify_all()
            return True

    def take(self, job) -> Iterator:
        """JOB's batches (the first job's, or the one accept() took)."""
        steps = job.plan.steps - job.start
        for i in range(steps):
            item = self._ready.get()
            self._idle.clear()  # there is room now: the feeder goes on
            if isinstance(item, _Failure):
                raise item.exc
            if item is _END:
                raise RuntimeError("the feed ended before the epoch did")
            if i == steps - 1:
                with self._cond:
                    self._whole, self._whole_at = True, time.monotonic()
            yield item

    @property
    def whole(self) -> bool:
        """The current job's batches have all been taken (the stream can go on)."""
        return self._whole

    def wait_ahead(self, timeout: float) -> bool:
        """Wait until the feeder has filled the queue (or ended): what it does meanwhile
        is then done, but for a batch still in the decoder. For benchmarks that time runs
        back to back, so that one run's work ahead is not done in the next one's time."""
        deadline = time.monotonic() + timeout
        while not (self._ended or self._idle.wait(_POLL_S)):
            if time.monotonic() > deadline:
                return False
        return True

    def stop(self) -> None:
        """End the feeder thread; what it made is dropped."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join()
