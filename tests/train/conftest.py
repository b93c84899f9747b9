"""Fixtures for the trainer tests: tiny real shard datasets packed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from shard_tools.pack import PackConfig, pack
from shard_tools.synth import make_image_folder


def _pack(
    root: Path, *, num_classes: int, per_class: int, max_count: int, seed: int, classes=None
) -> Path:
    src = make_image_folder(
        root / "src", num_classes=num_classes, per_class=per_class, size=32, seed=seed
    )
    dest = root / "shards"
    cfg = PackConfig(src=str(src), dest=str(dest), max_count=max_count, workers=1, classes=classes)
    pack(cfg, progress=False)
    return dest


@pytest.fixture(scope="session")
def tiny_train(tmp_path_factory) -> Path:
    """4 classes x 25 images (32 px) in 7 shards of <= 15 samples: uneven on purpose."""
    return _pack(
        tmp_path_factory.mktemp("tiny_train"), num_classes=4, per_class=25, max_count=15, seed=1
    )


@pytest.fixture(scope="session")
def tiny_val(tmp_path_factory) -> Path:
    """4 classes x 10 other images, 2 shards."""
    return _pack(
        tmp_path_factory.mktemp("tiny_val"), num_classes=4, per_class=10, max_count=25, seed=2
    )


@pytest.fixture(scope="session")
def three_class(tmp_path_factory) -> Path:
    """3 classes x 8 images: a dataset whose class count differs from tiny_train's."""
    return _pack(
        tmp_path_factory.mktemp("three_class"), num_classes=3, per_class=8, max_count=30, seed=3
    )


@pytest.fixture(scope="session")
def other_four(tmp_path_factory) -> Path:
    """4 classes like tiny_train, but other names (class01..class04): another label map."""
    root = tmp_path_factory.mktemp("other_four")
    return _pack(
        root,
        num_classes=5,
        per_class=4,
        max_count=30,
        seed=4,
        classes=("class01", "class02", "class03", "class04"),
    )
