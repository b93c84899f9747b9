"""The per-sample augmentation draws: vectorised over a batch, equal to one sample at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import augment


def _one_crop(counter: np.ndarray, width: int, height: int, scale, ratio) -> list[float]:
    """torchvision's RandomResizedCrop.get_params for one sample, its uniforms taken from
    the sample's counter: the reference the batched draw must equal."""
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(augment.RRC_ATTEMPTS):
        base = augment._U_RRC + 4 * attempt
        u = [float(augment.uniforms(counter, base + k)[0]) for k in range(4)]
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(lo + (hi - lo) * u[1])
        w = float(np.round(math.sqrt(target * aspect)))
        h = float(np.round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return [math.floor(u[3] * (width - w + 1)), math.floor(u[2] * (height - h + 1)), w, h]
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return [(width - w) // 2, (height - h) // 2, w, h]


@pytest.mark.parametrize(
    "scale, ratio",
    [((0.08, 1.0), (3 / 4, 4 / 3)),  # ImageNet's: most samples succeed at the first attempt
     ((0.9, 1.0), (0.2, 5.0)),  # many need several attempts, some the centre-crop fallback
     ((0.35, 1.0), (3 / 4, 4 / 3))],
)  # fmt: skip
def test_random_resized_crop_equals_the_one_sample_reference(scale, ratio):
    rng = np.random.default_rng(7)
    n = 400
    counters = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    width = rng.integers(1, 900, n)
    height = np.where(rng.random(n) < 0.2, rng.integers(1, 40, n), rng.integers(1, 900, n))
    got = augment.random_resized_crop(counters, width, height, scale, ratio)
    want = np.array([_one_crop(counters[i : i + 1], int(width[i]), int(height[i]), scale, ratio)
                     for i in range(n)], dtype=np.float32)  # fmt: skip
    np.testing.assert_array_equal(got, want)
    assert (got[:, 2] >= 1).all() and (got[:, 0] + got[:, 2] <= width).all()
    assert (got[:, 3] >= 1).all() and (got[:, 1] + got[:, 3] <= height).all()


def test_a_sample_draws_the_same_crop_in_any_batch():
    rng = np.random.default_rng(3)
    counters = rng.integers(0, 2**63, 64, dtype=np.int64).astype(np.uint64)
    width, height = rng.integers(20, 600, 64), rng.integers(20, 600, 64)
    whole = augment.random_resized_crop(counters, width, height, (0.08, 1.0), (0.5, 2.0))
    perm = rng.permutation(64)[:17]
    part = augment.random_resized_crop(counters[perm], width[perm], height[perm], (0.08, 1.0),
                                       (0.5, 2.0))  # fmt: skip
    np.testing.assert_array_equal(part, whole[perm])
