"""Process-group setup and teardown, and the few collectives the trainer uses.

A plain ``python -m train`` is a world of one and never creates a process
group; every helper here then degrades to the local value, so the loop has no
``if distributed`` branches.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline import World

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Dist:
    """This process's place in the job and the device it computes on."""

    world: World
    device: torch.device
    backend: str  # "nccl", "gloo", or "none" for a world of one

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0


def pick_device(device: str, world: World) -> torch.device:
    """cuda:<local_rank> for "cuda" (or "auto" with a GPU visible), else cpu."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def setup(*, device: str = "auto", dist_backend: str = "auto", timeout_s: int = 600) -> Dist:
    """Pick the device, set it, then join the process group (in that order: NCCL binds
    each rank to the current device at init, so setting it later puts every rank on GPU 0)."""
    world = World.from_env()
    dev = pick_device(device, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = dist_backend
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("--dist-backend nccl needs a CUDA device")
    if world.world_size == 1:
        return Dist(world=world, device=dev, backend="none")
    timeout = _dt.timedelta(seconds=timeout_s)
    # torchrun keeps one rendezvous store for all restarts of a job, and the process
    # group's keys are not namespaced per attempt: a restarted rank can read a dead
    # peer's address from the previous attempt ("Connection refused", or a hang).
    # A per-attempt prefix keeps every attempt's keys apart.
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"shardflow/attempt-{restart_count()}", store)
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=world.rank,
        world_size=world.world_size,
        timeout=timeout,
        **kwargs,
    )
    return Dist(world=world, device=dev, backend=backend)


def teardown() -> None:
    """Destroy the process group if one exists (safe to call in any ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (one collective; float64 so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if active():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_object(obj: object) -> list[object]:
    """Every rank's OBJ, indexed by rank (a list of one without a process group)."""
    if not active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class PeerError(ValueError):
    """Rank 0 met a bad-input error (ValueError/OSError) in work it does for every rank."""


def decided_by_rank0(fn: Callable[[], T]) -> T:
    """FN's result on rank 0, handed to every rank (FN runs on rank 0 only).

    For decisions that must be the same everywhere although each rank could see
    something else (a node-local run directory, say). If FN raises a ValueError
    or OSError on rank 0, every other rank raises PeerError with its message
    instead of waiting forever for a result.
    """
    if not active():
        return fn()
    result: Any = None
    failure: str | None = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except (ValueError, OSError) as exc:
            broadcast_object((None, str(exc)))
            raise
    result, failure = broadcast_object((result, failure))
    if failure is not None:
        raise PeerError(f"rank 0: {failure}")
    return result


def read_everywhere(fn: Callable[[], T]) -> T:
    """FN's result on every rank: each rank runs FN; those where it fails with a
    ValueError or OSError (a file only rank 0's node has) get rank 0's result.

    Costs one small collective when every rank can read for itself, and one
    broadcast of the result otherwise.
    """
    if not active():
        return fn()
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except (ValueError, OSError) as exc:
        error = exc
    failures = all_gather_object(None if error is None else str(error))
    failure = failures[dist.get_rank()]
    if failures[0] is not None:  # rank 0 cannot read it either: everyone reports rank 0's error
        if dist.get_rank() == 0:
            raise error
        raise PeerError(f"rank 0: {failures[0]}")
    if all(f is None for f in failures):
        return result
    shared = broadcast_object(result if dist.get_rank() == 0 else None)
    return result if failure is None else shared


def barrier() -> None:
    if active():
        dist.barrier()


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
