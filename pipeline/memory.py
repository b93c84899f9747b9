"""Giving the planner's freed temporaries back to the operating system.

Planning an epoch builds arrays of a few bytes per sample and frees most of them
again (the shard order, the whole stream, every rank's cut, sort buffers). glibc
keeps freed chunks of that size in its heap (its mmap threshold grows after the
first large free), so a process that planned 10^7 samples stays hundreds of MB
larger than what it still holds, on every rank. ``malloc_trim`` hands the free
pages back; elsewhere (musl, macOS) there is nothing to call and nothing is done.

The shard reader's process wants the opposite (:func:`keep_freed_memory`): it
copies every image out of a read buffer and frees it again a few batches later,
and memory the OS must fault in and zero first is copied into at a fifth of the
speed of memory the heap already holds (page faults: ~4 against ~24 GB/s here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations up to this size come from the heap (a read of max_read_mb fits), so their
# pages are reused instead of mapped and unmapped per read; glibc's ceiling is 32 MiB.
_HEAP_UP_TO = 32 << 20
# Free memory at the heap's top kept for reuse instead of handed back: the reader's
# working set (its shuffle buffer and reads in flight) comes back every batch.
_KEEP_FREE = 1 << 30
# Allocations between two collections of the youngest generation (CPython's default: 700).
_GC_EVERY = 70_000


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _malloc_trim():
    return getattr(_libc(), "malloc_trim", None)


def release_freed_memory() -> bool:
    """Return free heap pages to the OS (glibc); True if it could be asked to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def keep_freed_memory() -> bool:
    """Make this process's heap keep and reuse what it frees (glibc; a process whose
    working set recurs, like the shard reader's); True if it could be asked to."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_UP_TO)) & bool(
        mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE)
    )


def collect_rarely() -> None:
    """Keep Python's cycle collector out of a process that allocates a few objects per
    sample and holds thousands of samples (the shard reader's).

    With the default thresholds its full collections walk every object the process
    holds, the modules imported before it (torch: ~360k objects) included, again and
    again: 30-40% of the reader's time. What exists now is frozen (never walked again)
    and collections run a hundred times less often; cycles are still collected.
    """
    gc.freeze()
    gc.set_threshold(_GC_EVERY, 20, 100)
