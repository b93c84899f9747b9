"""A run's state as named parts that each save and load themselves.

A checkpoint (format 2) holds ``meta`` and ``config`` beside one entry per
part: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``ema`` (when
kept), ``masks``, ``loader``, ``rng`` and ``progress``. Each part is an object
with ``state_dict()`` / ``load_state_dict()`` (torch's own objects are used as
they are), so a new stateful piece of a run is one more entry in
:func:`run_parts`, not four edits in save and resume (torchtitan's
CheckpointManager composes a checkpoint the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from train import checkpoint, distributed

RANK_SEED_SALT = 0x7EA1


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank, RANK_SEED_SALT]).generate_state(1)[0])


@dataclass
class ModelWeights:
    """The plain model's weights (never DDP's or torch.compile's prefixed names)."""

    model: nn.Module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        checkpoint.load_weights(self.model, state)


@dataclass
class Progress:
    """Where the run is: optimizer steps done, the epoch in progress, steps done in it."""

    train_state: Any  # train.loop.TrainState (its counters are what the loop advances)

    def state_dict(self) -> dict[str, int]:
        st = self.train_state
        return {"step": st.step, "epoch": st.epoch, "step_in_epoch": st.step_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        st = self.train_state
        st.step, st.epoch, st.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]


@dataclass
class Masks:
    """Pruning masks (parameter name -> keep mask), kept beside their parameters."""

    train_state: Any
    source: str = "the checkpoint"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.bool().cpu() for k, v in self.train_state.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.train_state.masks = device_masks(self.train_state.model, state, self.source)


@dataclass
class RankRngs:
    """Every rank's RNG streams. Saving is a collective (each rank's state is gathered);
    loading continues this rank's streams, or, in a world of another size, starts
    fresh per-rank streams from the resumed step."""

    rank: int
    world_size: int
    seed: int
    train_state: Any

    def state_dict(self) -> list[dict[str, Any]]:
        return distributed.all_gather_object(checkpoint.rng_state())

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        if len(state or []) == self.world_size:
            checkpoint.set_rng_state(state[self.rank])
        else:  # no per-rank stream to continue
            torch.manual_seed(rank_seed(self.seed + self.train_state.step, self.rank))


def device_masks(
    model: nn.Module, masks: dict[str, torch.Tensor], url: str
) -> dict[str, torch.Tensor]:
    """Check MASKS against MODEL's parameters; as float tensors beside them, applied."""
    from train.loop import apply_masks

    params = dict(model.named_parameters())
    out = {}
    for name, mask in masks.items():
        if name not in params or params[name].shape != mask.shape:
            raise checkpoint.CheckpointError(f"{url}: pruning mask {name} does not fit the model")
        out[name] = mask.to(device=params[name].device, dtype=params[name].dtype)
    if out:
        apply_masks(model, out)
    return out


def run_parts(run) -> dict[str, Stateful]:
    """The parts of RUN's state, by checkpoint key. ``progress`` comes first when loading:
    another world size reseeds the RNGs from the resumed step."""
    st = run.state
    parts: dict[str, Stateful] = {
        "progress": Progress(st),
        "model": ModelWeights(st.model),
        "optimizer": st.optimizer,
        "scheduler": st.scheduler,
        "scaler": st.scaler,
        "masks": Masks(st),
        "loader": run.loader,
        "rng": RankRngs(run.dist.rank, run.dist.world_size, run.cfg.run.seed, st),
    }
    if st.ema is not None:
        parts["ema"] = st.ema
    return parts


def save_parts(parts: dict[str, Stateful]) -> dict[str, Any]:
    """Every part's state_dict (on every rank: some parts gather from all ranks)."""
    return {name: part.state_dict() for name, part in parts.items()}


def load_parts(parts: dict[str, Stateful], saved: dict[str, Any], url: str) -> None:
    """Load each part from SAVED. A part the checkpoint does not hold (an EMA the earlier
    run did not keep, a scaler of a run without fp16) keeps its fresh state."""
    for name, part in parts.items():
        if isinstance(part, Masks):
            part.source = url
        state = saved.get(name)
        if state is None or (name == "scaler" and not state):
            continue
        part.load_state_dict(state)
