"""The synthetic backend and the common loader contract (no data needed)."""

from __future__ import annotations

import pytest
import torch

from pipeline import Batch, LoaderConfig, World, build_loader


def _cfg(**kw):
    base = dict(
        backend="synthetic", batch_size=8, image_size=16, synthetic_samples=100, num_classes=10
    )
    return LoaderConfig(**{**base, **kw})


def test_batches_have_the_promised_type():
    loader = build_loader(_cfg(dtype="bfloat16"), World())
    assert len(loader) == 13  # ceil(100 / 8) under the pad policy
    batches = list(loader)
    assert len(batches) == 13
    b = batches[0]
    assert isinstance(b, Batch)
    assert b.images.shape == (8, 3, 16, 16) and b.images.dtype == torch.bfloat16
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    assert b.labels.dtype == torch.int64 and int(b.labels.max()) < 10
    report = loader.epoch_report()
    assert report.repeated == 4 and report.steps == 13
    assert len(set(report.keys)) == 100


def test_equal_steps_on_every_rank_and_drop():
    lens = {
        len(build_loader(_cfg(remainder="drop"), World(rank=r, world_size=3))) for r in range(3)
    }
    assert lens == {4}  # floor(100 / 24)


def test_resume_and_epochs():
    cfg = _cfg()
    a = build_loader(cfg, World())
    a.set_epoch(2)
    full = [b.keys for b in a]
    a.set_epoch(3)
    assert [b.keys for b in a] != full
    b = build_loader(cfg, World())
    b.set_epoch(2)
    it = iter(b)
    head = [next(it).keys for _ in range(5)]
    state = b.state_dict()
    c = build_loader(cfg, World())
    c.load_state_dict(state)
    c.set_epoch(2)  # same epoch: keeps the position
    assert len(c) == 8 and c.step == 5 and c.epoch_steps == 13
    assert head + [x.keys for x in c] == full


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="backend"):
        LoaderConfig(backend="nope", batch_size=1)
    with pytest.raises(ValueError, match="needs data"):
        LoaderConfig(backend="torch", batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        LoaderConfig(backend="synthetic", batch_size=0)
    with pytest.raises(ValueError, match="hw_decoder_load"):
        LoaderConfig(backend="synthetic", batch_size=1, hw_decoder_load=1.5)
    with pytest.raises(ValueError, match="state"):
        build_loader(_cfg(), World()).load_state_dict({"version": 1, "seed": 9})
