"""Checkpoints: atomic writes, newest-complete discovery, safe loading, RNG capture.

Layout: ``RUN_DIR/checkpoints/step-000001234.pt``. A checkpoint is written under
a ``.partial`` name and renamed (locally: fsync + ``os.replace``; on object
stores: upload then server-side move, the object appearing whole), so a file
with the final name is always complete. Contents are tensors and plain
containers only, so ``torch.load(weights_only=True)`` reads them and a
checkpoint can never run code.
"""

from __future__ import annotations

import os
import random
import re
import sys
from typing import Any

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

# 2: one entry per part of the run's state (train.state), progress included; 1 kept
# step, epoch and step_in_epoch at the top. Format 1 files load, upgraded.
FORMAT = 2
_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def checkpoint_dir(run_dir: str) -> str:
    return run_dir.rstrip("/") + "/checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def save(run_dir: str, state: dict[str, Any], step: int, *, keep: int) -> str:
    """Write STATE atomically as the checkpoint of STEP, then prune to the KEEP newest."""
    directory = checkpoint_dir(run_dir)
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    final = f"{root}/{checkpoint_name(step)}"
    partial = final + ".partial"
    if isinstance(fs, LocalFileSystem):
        with open(partial, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, final)
        # Make the rename itself durable: a crash must not resurrect an older directory entry.
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    else:
        with fs.open(partial, "wb") as f:
            torch.save(state, f)
        fs.mv(partial, final)
    _prune(fs, root, keep)
    return directory + "/" + checkpoint_name(step)


def _prune(fs: Any, root: str, keep: int) -> None:
    found = _list(fs, root)
    for _step, path in found[:-keep] if keep else []:
        fs.rm(path)


def _list(fs: Any, root: str) -> list[tuple[int, str]]:
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for path in names:
        m = _NAME.match(path.rstrip("/").rsplit("/", 1)[-1])
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, url) of every complete checkpoint under RUN_DIR, oldest first."""
    directory = checkpoint_dir(run_dir)
    fs, root = fsspec.core.url_to_fs(directory)
    local = isinstance(fs, LocalFileSystem)
    return [(step, path if local else fs.unstrip_protocol(path)) for step, path in _list(fs, root)]


def load(url: str) -> dict[str, Any]:
    """Read a checkpoint (or a plain state_dict file) with weights_only=True, on CPU."""
    try:
        with fsspec.open(url, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {url} does not exist") from None
    except Exception as exc:  # torch raises a zoo of types for a bad file; all mean "unreadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {url} is unreadable ({first[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {url} holds a {type(state).__name__}, not a dict")
    return upgrade(state)


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 training checkpoint in today's layout (other dicts as they are)."""
    if state.get("format") != 1:
        return state
    out = {k: v for k, v in state.items() if k not in ("step", "epoch", "step_in_epoch")}
    if "step" in state:
        out["progress"] = {
            "step": state["step"],
            "epoch": state.get("epoch", 0),
            "step_in_epoch": state.get("step_in_epoch", 0),
        }
    out["format"] = FORMAT
    return out


def step_of(state: dict[str, Any]) -> int | None:
    """The optimizer step a training checkpoint was taken at (None for a plain state_dict)."""
    return (state.get("progress") or {}).get("step")


def load_latest(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint under RUN_DIR that loads; unreadable ones are skipped with a warning."""
    for step, url in reversed(list_checkpoints(run_dir)):
        try:
            state = load(url)
        except CheckpointError as exc:
            print(f"train: warning: skipping step {step}: {exc}", file=sys.stderr, flush=True)
            continue
        if state.get("format") == FORMAT:  # load() upgraded older readable formats
            return url, state
        print(
            f"train: warning: skipping {url}: not a training checkpoint",
            file=sys.stderr,
            flush=True,
        )
    return None


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP adds "module.", torch.compile adds "_orig_mod."; saved weights should carry neither.
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def model_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights in a training checkpoint, or a plain state_dict as it is."""
    sd = state["model"] if "model" in state and isinstance(state["model"], dict) else state
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("checkpoint holds no model state_dict")
    return _strip_prefixes(sd)


def load_weights(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    strict: bool = True,
    skip: tuple[str, ...] = (),
) -> list[str]:
    """Copy SD into MODEL. strict: every key must match in name and shape. Otherwise the
    keys under the SKIP prefixes, and keys whose shapes differ, are left at their
    initial values; returns the names of the parameters not loaded."""
    sd = _strip_prefixes(sd)
    own = model.state_dict()
    if strict:
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shapes = sorted(k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape)
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
            if unexpected:
                parts.append(
                    f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}"
                )
            for k in shapes[:3]:
                parts.append(
                    f"{k} is {tuple(sd[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
                )
            raise CheckpointError("checkpoint does not fit the model: " + "; ".join(parts))
        model.load_state_dict(sd)
        return []
    usable = {
        k: v
        for k, v in sd.items()
        if k in own and own[k].shape == v.shape and not any(k.startswith(p) for p in skip)
    }
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
