"""Entry point: ``torchrun --nproc-per-node N -m train ...`` or plain ``python -m train ...``.

Bad input (flags, config files, datasets, checkpoints) ends with one
``train: error: ...`` line and a non-zero status: 2 for usage, 1 otherwise.
Anything else is a bug and keeps its traceback (and, under torchrun, the
per-rank error file that ``@record`` writes).
"""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import record

from train import distributed
from train.config import parse_args
from train.entry import exit_now, status_of
from train.errors import known_error, print_error
from train.trainer import build, train


@record
def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as exc:
        print_error("train", str(exc))
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
        # No rank tears its connections down while a peer is still in the last collective.
        distributed.barrier()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not known_error(exc):
            raise
        print_error("train", str(exc))
        return 1
    finally:
        if run is not None:
            run.close()
        distributed.teardown()


if __name__ == "__main__":
    exit_now(status_of(main))  # see train.entry: no interpreter finalization after teardown
