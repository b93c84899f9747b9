"""Per-sample augmentation parameters, drawn from (seed, epoch, sample key) alone.

The DALI backends do not let DALI draw anything: each sample's crop window,
flips, rotation, translation and colour factors come from here, as arrays
fed to the graph beside the encoded bytes. A sample therefore gets the same
pixels whatever rank, step or batch position it lands in, so a run resumed
from a checkpoint (with the same world size or another) produces exactly the
images the uninterrupted run would have, and the pipeline is built once
instead of being reseeded per epoch or resume.

Every sample's key is hashed once (64 bits of BLAKE2b, kept with what else the
reader learns of a sample) and mixed with a hash of the seed and epoch into a
64-bit counter; its random numbers are splitmix64 of that counter plus their
index, so a batch's parameters are a few vectorised array operations. The distributions
are those of the torch backend's torchvision transforms (random resized crop
with torchvision's ten attempts and its centre-crop fallback, pad + random
crop, rotation and translation uniform in their ranges, colour factors uniform
in 1 +- x, flips with their probabilities).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
RRC_ATTEMPTS = 10
# Which uniform each parameter uses (fixed: changing it changes every image).
_U_FLIP_H, _U_FLIP_V, _U_ANGLE, _U_TX, _U_TY, _U_B, _U_C, _U_S, _U_PAD_X, _U_PAD_Y = range(10)
_U_RRC = 16  # 4 uniforms per attempt from here on


def key_hashes(keys: list[str]) -> np.ndarray:
    """64 bits of BLAKE2b of each key (uint64)."""
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(key.encode(), digest_size=8).digest() for key in keys])
    # each digest read as a little-endian integer
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_counters(key_hash: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One 64-bit counter per sample (uint64), from (seed, epoch, its key's hash)."""
    salt = hashlib.blake2b(f"{seed}\x1f{epoch}".encode(), digest_size=8).digest()
    return _mix(np.asarray(key_hash, dtype=np.uint64) ^ np.frombuffer(salt, dtype="<u8")[0])


def uniforms(counters: np.ndarray, which: int | np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per counter, for draw number WHICH (splitmix64)."""
    with np.errstate(over="ignore"):
        z = _mix(counters + (np.asarray(which, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True, kw_only=True)
class BatchParams:
    """A batch's augmentation, one row per sample (float32 / int32 arrays)."""

    crop: np.ndarray | None  # [B, 4] x, y, w, h in source pixels (random resized crop)
    pad_anchor: np.ndarray | None  # [B, 2] y, x of the crop in the padded image (small recipe)
    angle: np.ndarray | None  # [B] degrees
    offset: np.ndarray | None  # [B, 2] pixels of the output
    colour: np.ndarray | None  # [B, 3] brightness, contrast, saturation factors
    hflip: np.ndarray  # [B] 0/1
    vflip: np.ndarray  # [B] 0/1

    def rows(self, index: np.ndarray) -> BatchParams:
        """The same parameters for the rows INDEX (a corrupt sample replaced by another)."""
        pick = {k: (v[index] if v is not None else None) for k, v in self.__dict__.items()}
        return BatchParams(**pick)


def random_resized_crop(
    counters: np.ndarray, width: np.ndarray, height: np.ndarray, scale, ratio
) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for every sample: [B, 4] x, y, w, h."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    out = np.zeros((len(counters), 4), dtype=np.float32)
    # Every attempt of every sample at once ([B, attempts]); each takes its first success.
    base = _U_RRC + 4 * np.arange(RRC_ATTEMPTS)
    c = counters[:, None]
    area = (width * height).astype(np.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * uniforms(c, base))
    aspect = np.exp(log_lo + (log_hi - log_lo) * uniforms(c, base + 1))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width[:, None]) & (h <= height[:, None])
    first = ok.argmax(axis=1)
    done = ok[np.arange(len(counters)), first]
    rows = np.flatnonzero(done)
    at = first[rows]
    w, h = w[rows, at], h[rows, at]
    y = np.floor(uniforms(counters[rows], base[at] + 2) * (height[rows] - h + 1))
    x = np.floor(uniforms(counters[rows], base[at] + 3) * (width[rows] - w + 1))
    out[rows] = np.stack([x, y, w, h], axis=1)
    if not done.all():  # torchvision's fallback: the largest centre crop within the ratio range
        rest = ~done
        wr, hr = width[rest].astype(np.float64), height[rest].astype(np.float64)
        in_ratio = wr / hr
        w = np.where(
            in_ratio < ratio[0], wr, np.where(in_ratio > ratio[1], np.round(hr * ratio[1]), wr)
        )
        h = np.where(in_ratio < ratio[0], np.round(wr / ratio[0]), hr)
        out[rest] = np.stack([np.floor((wr - w) / 2), np.floor((hr - h) / 2), w, h], axis=1)
    return out


def draw(
    cfg, key_hash: np.ndarray, epoch: int, width: np.ndarray, height: np.ndarray
) -> BatchParams | None:
    """The augmentation of a training batch of samples whose keys hash to KEY_HASH
    (key_hashes; images of WIDTH x HEIGHT), or None for evaluation."""
    if not cfg.train:
        return None
    c = sample_counters(key_hash, cfg.seed, epoch)
    size = float(cfg.image_size)
    crop = pad_anchor = angle = offset = colour = None
    if cfg.recipe == "small":
        if cfg.pad_px:
            span = 2 * cfg.pad_px + 1
            dy = np.floor(uniforms(c, _U_PAD_Y) * span) - cfg.pad_px
            dx = np.floor(uniforms(c, _U_PAD_X) * span) - cfg.pad_px
            pad_anchor = np.stack([dy, dx], axis=1).astype(np.float32)
    else:
        crop = random_resized_crop(c, width, height, cfg.scale, cfg.ratio)
    if cfg.rotate_deg:
        angle = ((2 * uniforms(c, _U_ANGLE) - 1) * cfg.rotate_deg).astype(np.float32)
    if cfg.translate:
        shift = cfg.translate * size
        offset = np.stack([(2 * uniforms(c, _U_TX) - 1) * shift, (2 * uniforms(c, _U_TY) - 1) * shift],
                          axis=1).astype(np.float32)  # fmt: skip
    if cfg.brightness or cfg.contrast or cfg.saturation:
        amounts = np.array([cfg.brightness, cfg.contrast, cfg.saturation])
        u = np.stack([uniforms(c, k) for k in (_U_B, _U_C, _U_S)], axis=1)
        colour = (1 + (2 * u - 1) * amounts).astype(np.float32)
    hflip = (uniforms(c, _U_FLIP_H) < cfg.hflip).astype(np.int32)
    vflip = (uniforms(c, _U_FLIP_V) < cfg.vflip).astype(np.int32)
    return BatchParams(crop=crop, pad_anchor=pad_anchor, angle=angle, offset=offset, colour=colour,
                       hflip=hflip, vflip=vflip)  # fmt: skip
