"""The common loader: epochs, steps, resume state and accounting for every backend.

Backends only turn a planned step range into :class:`Batch` objects; what a
step holds is decided here (via :mod:`pipeline.order`), so every backend yields
the same keys in the same order and the same number of steps on every rank.

``len(loader)`` is the number of batches the next iteration yields: the steps
of the epoch for a fresh epoch, the remaining steps after ``load_state_dict``.
``epoch_steps`` is the epoch's total and ``step`` the steps already consumed.
Iterating an epoch that is complete replays it from its start (as
``DistributedSampler`` does without ``set_epoch``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.batch import Batch, EpochReport
from pipeline.config import LoaderConfig
from pipeline.memory import release_freed_memory
from pipeline.order import Generation, RankPlan, plan_rank
from pipeline.world import World

STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Job:
    """One iteration's work for a backend: steps ``start..plan.steps-1`` of PLAN."""

    cfg: LoaderConfig
    world: World
    epoch: int
    plan: RankPlan
    start: int
    dataset: Any  # pipeline.storage.Dataset, or None for synthetic data
    device: torch.device
    # The job a training loop most likely runs next (the next epoch from its start), for a
    # backend that can start reading it while this one's last batches are in flight.
    following: Callable[[], Job] | None = None

    def refs(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, index, pad) arrays of the samples of STEP, in batch order."""
        b = self.plan.batch_size
        ro = self.plan.ranks_order
        sel = ro.order[step * b : (step + 1) * b]
        return ro.shard[sel], ro.index[sel], ro.pad[sel]

    def ref_keys(self, step: int) -> list[str]:
        """Stand-in keys ("shard-000001.tar#17") for backends that read no data."""
        shard, index, _ = self.refs(step)
        names = self.dataset.shard_names if self.dataset is not None else None
        if names is None:
            return [f"synthetic-{i:09d}" for i in index.tolist()]
        return [f"{names[s]}#{i}" for s, i in zip(shard.tolist(), index.tolist(), strict=True)]

    def seed_for(self, step: int) -> int:
        """RNG seed of one batch: a function of (seed, epoch, rank, generation, step)."""
        ss = np.random.SeedSequence(
            [self.cfg.seed, self.epoch, self.world.rank, self.plan.generation, step]
        )
        return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)


class Loader:
    """Iterable of :class:`Batch`; see the module docstring for its contract."""

    def __init__(self, cfg: LoaderConfig, world: World, *, dataset, backend, device) -> None:
        self.cfg = cfg
        self.world = world
        self.dataset = dataset
        self.backend = backend
        self.device = device
        self._sizes = (
            dataset.manifest.shard_sizes
            if dataset is not None
            else np.array([cfg.synthetic_samples], dtype=np.int64)
        )
        self._epoch = 0
        self._history: list[Generation] = []
        self._step = 0  # steps consumed in the current generation
        self._plan: RankPlan | None = None
        self._ahead: tuple[int, RankPlan] | None = None  # (epoch, plan) made by following()
        self._ahead_lock = threading.Lock()
        self._active: Iterator[Batch] | None = None
        self._reset_report()

    # -- planning ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        if self.dataset is not None:
            return self.dataset.manifest.num_classes
        return self.cfg.num_classes

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_samples(self) -> int:
        """Samples in the dataset (one epoch, all ranks, before pad/drop)."""
        return int(np.sum(self._sizes))

    def plan(self) -> RankPlan:
        """The current generation's plan for this rank (cached)."""
        if self._plan is None:
            with self._ahead_lock:
                ahead = self._ahead
                if ahead is not None and ahead[0] == self._epoch and not self._history:
                    self._plan = ahead[1]  # planned as the epoch before ended: the same plan
                    self._ahead = None
            if self._plan is None:
                self._plan = self._plan_for(self._epoch, self._history)
        return self._plan

    def _plan_for(self, epoch: int, history: list[Generation]) -> RankPlan:
        plan = plan_rank(
            self._sizes,
            epoch=epoch,
            seed=self.cfg.seed,
            policy=self.cfg.remainder,
            shuffle=self.cfg.shuffling,
            buffer=self.cfg.shuffle_buffer,
            history=history,
            world_size=self.world.world_size,
            batch_size=self.cfg.batch_size,
            rank=self.world.rank,
            initial=self.cfg.buffer_start or None,
        )
        release_freed_memory()  # the plan's temporaries, not kept by the heap
        return plan

    def _following(self, job: Job) -> Job:
        """The next epoch from its start, planned now (from a backend's thread); plan()
        takes this plan if that epoch is the one set next."""
        epoch = job.epoch + 1
        plan = self._plan_for(epoch, [])
        with self._ahead_lock:
            self._ahead = (epoch, plan)
        return Job(cfg=self.cfg, world=self.world, epoch=epoch, plan=plan, start=0,
                   dataset=self.dataset, device=self.device)  # fmt: skip

    @property
    def epoch_steps(self) -> int:
        """Steps of the whole current epoch (earlier generations included)."""
        return self.plan().epoch_steps

    @property
    def step(self) -> int:
        """Steps of the current epoch already consumed."""
        return self.plan().step_offset + self._step

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. Setting the current epoch again keeps the
        position (so ``load_state_dict`` then ``set_epoch(same)`` resumes)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch == self._epoch:
            return
        self._close_active()
        self._epoch = epoch
        self._history = []
        self._step = 0
        self._plan = None
        self._reset_report()

    def __len__(self) -> int:
        plan = self.plan()
        if self._step < plan.steps:
            return plan.steps - self._step
        # The epoch is complete: the next iteration replays it from a fresh plan.
        saved = (self._history, self._plan)
        self._history, self._plan = [], None
        try:
            return self.plan().steps
        finally:
            self._history, self._plan = saved

    # -- iteration --------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        self._close_active()
        if self._step >= self.plan().steps:
            self._restart_epoch()
        plan = self.plan()
        job = Job(
            cfg=self.cfg,
            world=self.world,
            epoch=self._epoch,
            plan=plan,
            start=self._step,
            dataset=self.dataset,
            device=self.device,
        )
        job = dataclasses.replace(job, following=lambda: self._following(job))
        self._active = self._run(job)
        return self._active

    def _run(self, job: Job) -> Iterator[Batch]:
        source = self.backend.batches(job)
        try:
            for step in range(job.start, job.plan.steps):
                batch = next(source)
                _, _, pad = job.refs(step)
                self._account(batch, int(pad.sum()))
                self._step = step + 1
                yield batch
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _restart_epoch(self) -> None:
        self._history = []
        self._step = 0
        self._plan = None
        self._reset_report()

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    # -- accounting -------------------------------------------------------------
    def _reset_report(self) -> None:
        self._keys: list[str] = []
        self._corrupt: list[str] = []
        self._repeated = 0
        self._steps_seen = 0
        self._retried_before = self.dataset.retried if self.dataset is not None else 0

    def _account(self, batch: Batch, repeated: int) -> None:
        self._keys.extend(batch.keys)
        self._corrupt.extend(batch.skipped)
        self._repeated += repeated
        self._steps_seen += 1

    def epoch_report(self) -> EpochReport:
        """Keys this rank was handed this epoch, with repeat/drop/corrupt counts."""
        plan = self.plan()
        return EpochReport(
            epoch=self._epoch,
            rank=self.world.rank,
            world_size=self.world.world_size,
            steps=self._steps_seen,
            keys=tuple(self._keys),
            repeated=self._repeated,
            dropped=plan.dropped_before + plan.split.num_dropped,
            corrupt=tuple(self._corrupt),
            retries=(self.dataset.retried if self.dataset is not None else 0)
            - self._retried_before,
        )

    # -- resume -----------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.cfg.seed,
            "remainder": self.cfg.remainder,
            "shuffle": self.cfg.shuffling,
            "shuffle_buffer": self.cfg.shuffle_buffer if self.cfg.shuffling else 0,
            "shuffle_initial": self.cfg.buffer_start,
            "num_samples": self.num_samples,
            "num_shards": len(self._sizes),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches handed out so far; plain JSON-able values."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "generations": [[g.world_size, g.batch_size, g.steps] for g in self._history],
            "world_size": self.world.world_size,
            "batch_size": self.cfg.batch_size,
            "step": self._step,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where STATE left off. With the same world size and batch size the
        next batches are exactly those the saved loader would have yielded; with
        another, the epoch's unconsumed samples are re-split over this world."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        mine = self._fingerprint()
        if "shuffle_initial" not in state:  # saved before it existed: the buffer started full
            buffer = state.get("shuffle_buffer") or 0
            state = {**state, "shuffle_initial": buffer if buffer > 1 else 0}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                    f"{key}={value!r}; resume with the same dataset, seed and shuffle settings"
                )
        self._close_active()
        history = [Generation(int(w), int(b), int(s)) for w, b, s in state["generations"]]
        step = int(state["step"])
        same = (
            state["world_size"] == self.world.world_size
            and state["batch_size"] == self.cfg.batch_size
        )
        if not same and step > 0:
            history.append(Generation(int(state["world_size"]), int(state["batch_size"]), step))
            step = 0
        self._epoch = int(state["epoch"])
        self._history = history
        self._step = step
        self._plan = None
        self._reset_report()
        if self._step > self.plan().steps:
            raise ValueError("loader state is past the end of its epoch")

    # -- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        """Stop background readers/workers. The loader cannot be used afterwards."""
        self._close_active()
        self.backend.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
