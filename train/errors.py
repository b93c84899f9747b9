"""Which failures are the user's to fix (one line, exit 1) and which are bugs (traceback)."""

from __future__ import annotations

import os
import sys

from shard_tools.format import redact


def known_error(exc: BaseException) -> bool:
    """Errors that describe bad input or environment, not a bug in this code."""
    # ManifestError and CheckpointError are ValueErrors; the pipeline's own error
    # types (a shard that cannot be read, a backend that cannot run here) are
    # recognised by their package.
    return isinstance(exc, ValueError | OSError) or type(exc).__module__.startswith("pipeline.")


def print_error(prog: str, message: str) -> None:
    """``PROG: error [rank R]: MESSAGE`` on stderr, credentials in URLs redacted."""
    # Under torchrun every rank may report the same problem: say which rank speaks.
    where = f" [rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"{prog}: error{where}: {redact(message)}", file=sys.stderr, flush=True)
