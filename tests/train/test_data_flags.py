"""Every loader setting a run may want is a trainer flag and a [data] key that reaches the loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import World, build_loader
from shard_tools.config import PackConfig
from shard_tools.pack import pack
from train.config import DataConfig, load_config_file, parse_args
from train.data import loader_config

FLAGS = ["--data", "d", "--out", "o", "--rotate-deg", "15", "--translate", "0.1",
         "--vflip", "0.5", "--scale", "0.35,1", "--ratio", "0.5,2", "--pad-px", "2",
         "--brightness", "0.2", "--contrast", "0.3", "--saturation", "0.4",
         "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--eval-resize", "40",
         "--dtype", "float16", "--dali-threads", "3", "--num-workers", "1", "--prefetch", "4",
         "--read-ahead", "5", "--max-read-mb", "16", "--retries", "1", "--retry-backoff-s", "0.1",
         "--hw-decoder-load", "0.9", "--hand-over", "files", "--no-shuffle", "--shuffle-buffer", "128",
         "--cache-max-gb", "2"]  # fmt: skip
TOML = """
[data]
data = "d"
rotate_deg = 15
translate = 0.1
vflip = 0.5
scale = [0.35, 1]
ratio = [0.5, 2]
pad_px = 2
brightness = 0.2
contrast = 0.3
saturation = 0.4
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
eval_resize = 40
dtype = "float16"
dali_threads = 3
num_workers = 1
prefetch = 4
read_ahead = 5
max_read_mb = 16
retries = 1
retry_backoff_s = 0.1
hw_decoder_load = 0.9
hand_over = "files"
shuffle = false
shuffle_buffer = 128
cache_max_gb = 2
[run]
out = "o"
"""


def test_flags_and_toml_keys_give_the_same_config_and_round_trip_through_config_json(tmp_path):
    from_flags = parse_args(FLAGS)
    toml = tmp_path / "r.toml"
    toml.write_text(TOML)
    from_toml = parse_args(["--config", str(toml)])
    assert from_flags == from_toml
    d = from_flags.data
    assert (d.scale, d.mean, d.hw_decoder_load, d.hand_over, d.shuffle) == (
        (0.35, 1.0),
        (0.5, 0.5, 0.5),
        0.9,
        "files",
        False,
    )
    written = tmp_path / "config.json"
    from_flags.write_json(str(written))
    assert json.loads(written.read_text())["data"]["scale"] == [0.35, 1.0]
    assert parse_args(["--config", str(written)]) == from_flags
    lcfg = loader_config(d, url="d", train=True, per_rank_batch=8, image_size=32, seed=1,
                         device=torch.device("cpu"), num_classes=10)  # fmt: skip
    expected = {**d.loader_fields(), "num_threads": 3, "recipe": "small"}
    assert {k: getattr(lcfg, k) for k in expected} == expected


@pytest.mark.parametrize(("flags", "message"), [
    (["--rotate-deg", "200"], "--rotate-deg must be in [0, 180], got 200.0"),
    (["--translate", "1.5"], "--translate must be in [0, 1), got 1.5"),
    (["--scale", "0.9,0.5"], "--scale must satisfy"),
    (["--hw-decoder-load", "2"], "--hw-decoder-load must be in [0, 1], got 2.0"),
    (["--vflip", "1.5"], "--vflip is a probability in [0, 1], got 1.5"),
    (["--prefetch", "0"], "--prefetch must be >= 1, got 0"),
    (["--std", "0,1,1"], "mean and std need 3 values each, std > 0"),
])  # fmt: skip
def test_bad_values_name_their_flag(flags, message):
    with pytest.raises(ValueError) as caught:
        parse_args(["--data", "d", "--out", "o", *flags])
    assert message in str(caught.value)


def test_unknown_data_keys_and_wrong_types_are_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ndata = "d"\nscale = [1]\n')
    with pytest.raises(ValueError, match="data.scale must be a list of 2 numbers"):
        load_config_file(str(bad))
    bad.write_text('[data]\ndata = "d"\nrotation = 3\n')
    with pytest.raises(ValueError, match="unknown key data.rotation"):
        load_config_file(str(bad))
    assert DataConfig(data="d").dali_threads == 0  # 0: --num-workers, at least 1


# -- the settings reach the batches of every backend ---------------------------------

SIZE = 32


def _pattern(kind: str, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(yy - (SIZE - 1) / 2, xx - (SIZE - 1) / 2)
    if kind == "rings":  # the same under any rotation about the centre (black corners too)
        img = np.where(r < SIZE / 2 - 1, 120 + 100 * np.sin(r / 2), 0)
    elif kind == "bar":  # the top third bright: a rotation or flip moves it
        img = np.where(yy < SIZE // 3, 230, 20)
    else:  # a blob at the centre: a translation moves it
        img = np.where(r < 5, 240, 10)
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 4, (SIZE, SIZE)) if kind != "rings" else 0  # 8 different images
    return np.stack([img + noise + seed] * 3, axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def patterns(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for kind in ("rings", "bar", "blob"):
        root = tmp_path_factory.mktemp(kind)
        src = root / "src" / "c0"
        src.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(_pattern(kind, i)).save(src / f"{i}.png")
        pack(PackConfig(src=str(root / "src"), dest=str(root / "ds"), workers=1), progress=False)
        out[kind] = root / "ds"
    return out


BACKENDS = ["torch", pytest.param("dali-cpu", marks=pytest.mark.dali), "device-cache"]


def _batch(ds: Path, backend: str, **aug) -> torch.Tensor:
    """The first batch of 8 as float images, through the trainer's own loader mapping."""
    kw = (
        {"backend": "torch", "cache": "device"}
        if backend == "device-cache"
        else {"backend": backend}
    )
    plain = dict(num_workers=0, recipe="small", pad_px=0, hflip=0.0, shuffle=False, mean=(0, 0, 0),
                 std=(1, 1, 1))  # fmt: skip
    d = DataConfig(data=str(ds), **{**plain, **kw, **aug})
    cfg = loader_config(d, url=str(ds), train=True, per_rank_batch=8, image_size=SIZE, seed=2,
                        device=torch.device("cpu"), num_classes=1)  # fmt: skip
    with build_loader(cfg, World()) as loader:
        batch = next(iter(loader))
    order = np.argsort(batch.keys)
    return batch.images[order].float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vflip_and_hflip_flip_every_image(patterns, backend):
    plain = _batch(patterns["bar"], backend)
    assert torch.equal(_batch(patterns["bar"], backend, vflip=1.0), plain.flip(2))
    assert torch.equal(_batch(patterns["bar"], backend, hflip=1.0), plain.flip(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_turns_the_images(patterns, backend):
    def change(kind):
        return (
            (_batch(patterns[kind], backend, rotate_deg=180.0) - _batch(patterns[kind], backend))
            .abs()
            .mean()
        )

    # Rings are the same at any angle (interpolation and corners aside); a bar is not.
    assert change("bar") > 5 * change("rings") and change("bar") > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_translation_moves_the_images(patterns, backend):
    def centroids(images):
        w = images[:, 0]
        ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        total = w.sum(dim=(1, 2))
        return torch.stack([(w * ys).sum(dim=(1, 2)) / total, (w * xs).sum(dim=(1, 2)) / total], 1)

    shift = (centroids(_batch(patterns["blob"], backend, translate=0.25))
             - centroids(_batch(patterns["blob"], backend))).norm(dim=1)  # fmt: skip
    assert (shift > 0.5).sum() >= 6  # moved, nearly always
    assert shift.max() <= 0.25 * SIZE * 2**0.5 + 1  # never further than asked
