"""Checkpoints: round trip, atomic naming, newest-complete discovery, safe loading, RNG."""

from __future__ import annotations

import datetime
import random

import numpy as np
import pytest
import torch

from train import checkpoint
from train.checkpoint import CheckpointError
from train.models import build_model


def _state(step: int) -> dict:
    m = build_model("seed_cnn", 10)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {
        "format": checkpoint.FORMAT,
        "model": m.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "rng": [checkpoint.rng_state()],
        "loader": {"epoch": 1, "generations": [[2, 4, 3]], "step": 5},
    }


def test_round_trip_with_weights_only(tmp_path):
    state = _state(7)
    url = checkpoint.save(str(tmp_path), state, 7, keep=3)
    assert url.endswith("checkpoints/step-000000007.pt")
    loaded = checkpoint.load(url)
    assert loaded["step"] == 7 and loaded["loader"] == state["loader"]
    for k, v in state["model"].items():
        assert torch.equal(v, loaded["model"][k])
    m = build_model("seed_cnn", 10)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    checkpoint.load_weights(m, checkpoint.model_weights(loaded))
    opt.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"],
                       state["optimizer"]["state"][0]["momentum_buffer"])  # fmt: skip


def test_rng_state_restores_every_stream():
    saved = checkpoint.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    checkpoint.set_rng_state(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_partial_files_are_invisible_and_pruning_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(str(tmp_path), _state(step), step, keep=2)
    ckdir = tmp_path / "checkpoints"
    # A crash mid-write leaves only a .partial file: never listed, never loaded.
    (ckdir / "step-000000009.pt.partial").write_bytes(b"half a checkpoint")
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [3, 4]
    url, state = checkpoint.load_latest(str(tmp_path))
    assert state["step"] == 4 and url.endswith("step-000000004.pt")
    assert not any(p.name.endswith(".partial") for p in ckdir.iterdir() if "000000004" in p.name)


def test_resume_auto_skips_an_unreadable_newest(tmp_path, capsys):
    checkpoint.save(str(tmp_path), _state(5), 5, keep=3)
    (tmp_path / "checkpoints" / "step-000000006.pt").write_bytes(b"\x00garbage")
    url, state = checkpoint.load_latest(str(tmp_path))
    assert state["step"] == 5
    assert "skipping step 6" in capsys.readouterr().err
    assert checkpoint.load_latest(str(tmp_path / "elsewhere")) is None


def test_unreadable_and_unsafe_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(str(tmp_path / "junk.pt"))

    # Any global outside torch's allow-list (here a plain stdlib class) is refused by
    # weights_only loading: a checkpoint can never construct arbitrary objects.
    torch.save({"model": datetime.date(2020, 1, 1)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(str(tmp_path / "evil.pt"))


def test_strict_and_partial_weight_loading():
    src = build_model("seed_cnn", 10)
    dst = build_model("seed_cnn", 3)
    with pytest.raises(
        CheckpointError, match=r"fc3.weight is \(10, 84\) in the checkpoint, \(3, 84\)"
    ):
        checkpoint.load_weights(dst, src.state_dict())
    # Transfer: everything but the mismatched head is copied.
    skipped = checkpoint.load_weights(dst, src.state_dict(), strict=False)
    assert skipped == ["fc3.bias", "fc3.weight"]
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    # Prefixes from DDP / torch.compile are ignored.
    prefixed = {"module._orig_mod." + k: v for k, v in src.state_dict().items()}
    dst = build_model("seed_cnn", 10)
    checkpoint.load_weights(dst, prefixed)
    assert torch.equal(dst.fc3.weight, src.fc3.weight)
    with pytest.raises(CheckpointError, match="no model state_dict"):
        checkpoint.model_weights({"model": {"a": 1}})
