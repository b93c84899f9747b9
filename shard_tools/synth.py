"""Synthetic, learnable image folders for tests, demos and benchmarks without real data.

Each class is a combination of a hue, a shape and a texture, so neither colour
nor shape alone identifies it; every image adds a random background, jittered
hue, position and size, and pixel noise. A small CNN learns it well above
chance in a few epochs, but not instantly to 100%. Everything is a pure
function of ``seed``: the same call writes the same bytes.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FORMATS = {"jpeg": ("JPEG", "jpg"), "png": ("PNG", "png")}
SHAPES = ("ellipse", "rectangle", "triangle")


def class_names(num_classes: int) -> list[str]:
    """Folder names of the synthetic classes: class00, class01, ..."""
    width = max(2, len(str(num_classes - 1)))
    return [f"class{k:0{width}d}" for k in range(num_classes)]


def _class_style(k: int) -> tuple[float, str, bool]:
    # Hue steps by a golden-ratio fraction so neighbouring labels get distant
    # colours; shape and stripes cycle with other periods so that classes
    # share colours and shapes pairwise and only the combination is unique.
    hue = (k * 0.618034) % 1.0
    return hue, SHAPES[k % len(SHAPES)], (k // len(SHAPES)) % 2 == 1


def render(k: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image of class K drawn with RNG."""
    hue, shape, striped = _class_style(k)
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    h = (hue + rng.uniform(-0.06, 0.06)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    fg = (int(r * 255), int(g * 255), int(b * 255))
    side = rng.uniform(0.35, 0.75) * size
    x0 = rng.uniform(0, size - side)
    y0 = rng.uniform(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "ellipse":
        draw.ellipse(box, fill=fg)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fg)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fg)
    if striped:
        step = max(2, size // 8)
        for y in range(0, size, step * 2):
            draw.line([(0, y), (size, y)], fill=fg, width=max(1, step // 2))
    pixels = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0.0, 28.0, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(
    dest: str | Path,
    *,
    num_classes: int = 10,
    per_class: int = 100,
    size: int = 32,
    seed: int = 0,
    image_format: str = "jpeg",
) -> Path:
    """Write ``dest/<class_name>/<n>.jpg`` (or .png): NUM_CLASSES x PER_CLASS images.

    Deterministic in SEED; returns DEST as a Path.
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError("num_classes and per_class must be >= 1")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {sorted(FORMATS)}, got {image_format!r}")
    pil_format, ext = FORMATS[image_format]
    root = Path(dest)
    width = len(str(per_class - 1))
    for k, name in enumerate(class_names(num_classes)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            # One generator per image, keyed by (seed, class, index): any
            # image can be regenerated alone and the set never depends on order.
            rng = np.random.default_rng([seed, k, n])
            img = render(k, rng, size)
            options = {"quality": 90} if pil_format == "JPEG" else {}
            img.save(folder / f"{n:0{width}d}.{ext}", pil_format, **options)
    return root
