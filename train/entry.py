"""How the trainer's processes end: with their status, and without interpreter finalization.

torch's c10d backends keep native threads after ``destroy_process_group()``:
gloo's shutdown is a no-op and DDP's reducer keeps the backend, with its two
work threads and its socket loop, referenced until the process dies. Python
3.11 ends any native thread that touches the interpreter while it finalizes
with ``pthread_exit``; unwinding a C++ frame marked noexcept then calls
``std::terminate`` ("terminate called without an active exception"), and a
run that finished exits -6, which torchrun reports as a failure (and may
restart). Once everything is closed, flushed and torn down there is nothing
left for finalization to do, so the process ends right there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def status_of(main: Callable[[], int | None]) -> int:
    """MAIN's return value as an exit status; an exception is printed as Python would."""
    try:
        return int(main() or 0)
    except SystemExit as exc:  # argparse's --help and usage errors
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1


def exit_now(status: int) -> NoReturn:
    """Flush what Python would flush at exit, then end the process with STATUS."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken pipe: nothing to say
            stream.flush()
    os._exit(status)
