"""Fixtures for the shard_tools tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from shard_tools.synth import make_image_folder


@pytest.fixture
def small_src(tmp_path) -> Path:
    """3 classes x 10 tiny JPEGs."""
    return make_image_folder(tmp_path / "src", num_classes=3, per_class=10, size=16, seed=3)
