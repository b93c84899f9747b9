"""Test-only fault injection, read from the environment in this one place.

``SHARDFLOW_FAULT_KILL=RANK:STEP`` makes rank RANK SIGKILL itself right after
optimizer step STEP, on torchrun's first attempt only (the restarted job must
be able to pass the same step). The kill tests use it to check that a run
resumes at the exact position; it is not a trainer option.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from train import distributed

ENV = "SHARDFLOW_FAULT_KILL"


@dataclass(frozen=True)
class KillAt:
    rank: int
    step: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KillAt | None:
        text = environ.get(ENV, "").strip()
        if not text:
            return None
        rank, sep, step = text.partition(":")
        if not (sep and rank.isdigit() and step.isdigit() and int(step) > 0):
            raise ValueError(f"{ENV} must be RANK:STEP (e.g. 1:18), got {text!r}")
        return cls(rank=int(rank), step=int(step))

    def after_step(self, step: int, rank: int) -> None:
        """SIGKILL this process if it is the rank and step asked for (first attempt only)."""
        if step == self.step and rank == self.rank and distributed.restart_count() == 0:
            # Said first: torchrun may report the peer's failure instead of this exit.
            print(f"fault injection: SIGKILL rank {rank} after step {step}", file=sys.stderr,
                  flush=True)  # fmt: skip
            os.kill(os.getpid(), signal.SIGKILL)
