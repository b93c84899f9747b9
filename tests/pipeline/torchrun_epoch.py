"""Run by torchrun from test_torchrun.py: iterate one epoch per rank, all_reduce the step count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import LoaderConfig, World, build_loader


def main() -> None:
    data, out, backend = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    world = World.from_env()
    dist.init_process_group("gloo")
    try:
        cfg = LoaderConfig(
            data=data, backend=backend, batch_size=7, image_size=32, recipe="small", num_workers=0
        )
        loader = build_loader(cfg, world)
        loader.set_epoch(1)
        steps = 0
        for batch in loader:
            # A collective every step: an uneven split would hang here.
            total = batch.labels.sum()
            dist.all_reduce(total)
            steps += 1
        counts = torch.tensor([steps, steps])
        dist.all_reduce(counts[:1], op=dist.ReduceOp.MIN)
        dist.all_reduce(counts[1:], op=dist.ReduceOp.MAX)
        report = loader.epoch_report()
        result = {"rank": world.rank, "steps": steps, "len": len(loader), "min": int(counts[0]),
                  "max": int(counts[1]), "keys": list(report.keys), "repeated": report.repeated}  # fmt: skip
        (out / f"rank{world.rank}.json").write_text(json.dumps(result))
        loader.close()
        # Both ranks done before either tears gloo down: a rank that closes its
        # connections while its peer is still in a collective can abort the peer.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # As the trainer ends (train/entry.py): gloo's native threads outlive
    # destroy_process_group, and interpreter finalization can make them abort the rank
    # (SIGABRT, "terminate called without an active exception") after it finished.
    from train.entry import exit_now, status_of

    exit_now(status_of(main))
