"""Entry point: ``torchrun --nproc-per-node N -m train ...`` or plain ``python -m train ...``.

Bad input (flags, config files, datasets, checkpoints) ends with one
``train: error: ...`` line and a non-zero status: 2 for usage, 1 otherwise.
Anything else is a bug and keeps its traceback (and, under torchrun, the
per-rank error file that ``@record`` writes).
"""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from train import distributed
from train.config import parse_args
from train.trainer import build, train


def known_error(exc: BaseException) -> bool:
    """Errors that describe bad input or environment, not a bug in this code."""
    # ManifestError and CheckpointError are ValueErrors; the pipeline's own error
    # types (e.g. a backend that cannot run here) are recognised by their package.
    return isinstance(exc, ValueError | OSError) or type(exc).__module__.startswith("pipeline.")


def _error(message: str) -> None:
    # Under torchrun every rank may report the same problem: say which rank speaks.
    where = f" [rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"train: error{where}: {message}", file=sys.stderr, flush=True)


@record
def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as exc:
        _error(str(exc))
        return 2
    run = None
    try:
        d = distributed.setup(
            device=cfg.run.device,
            dist_backend=cfg.run.dist_backend,
            timeout_s=cfg.run.dist_timeout_s,
        )
        run = build(cfg, d)
        train(run)
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not known_error(exc):
            raise
        _error(str(exc))
        return 1
    finally:
        if run is not None:
            run.close()
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
