"""Giving the planner's freed temporaries back to the operating system.

Planning an epoch builds arrays of a few bytes per sample and frees most of them
again (the shard order, the whole stream, every rank's cut, sort buffers). glibc
keeps freed chunks of that size in its heap (its mmap threshold grows after the
first large free), so a process that planned 10^7 samples stays hundreds of MB
larger than what it still holds, on every rank. ``malloc_trim`` hands the free
pages back; elsewhere (musl, macOS) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return free heap pages to the OS (glibc); True if it could be asked to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
