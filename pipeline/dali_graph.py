"""The DALI decode + augment graph: one function of an encoded-bytes node.

Every DALI reader (here: ``fn.external_source`` fed by our own shard reader)
calls :func:`build_graph`; the same graph runs on the CPU (``dali-cpu``) or
with nvJPEG/CUDA (``dali-gpu``, decoder device "mixed"). Augmentations mean
what the torch backend's torchvision transforms mean (same config fields);
random draws differ between the two libraries, the distributions do not.

Output: HWC per sample (so the batch is NHWC, which is the channels_last
layout of an NCHW tensor: the torch side permutes the view, no copy).
"""

from __future__ import annotations

from nvidia.dali import fn, types

DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


def _decoder_device(device: str) -> str:
    return "mixed" if device == "gpu" else "cpu"


def _decoder_args(cfg, device: str) -> dict:
    """Keyword arguments every decoder of the graph gets."""
    args = {"device": _decoder_device(device), "output_type": types.RGB}
    if device == "gpu" and cfg.hw_decoder_load is not None:
        args["hw_decoder_load"] = cfg.hw_decoder_load  # the mixed decoder's split only
    return args


def _geometry(images, cfg):
    """Rotation (+-deg) and translation (+-fraction of the output) as one affine warp."""
    size = float(cfg.image_size)
    transforms = []
    if cfg.rotate_deg:
        angle = fn.random.uniform(range=(-cfg.rotate_deg, cfg.rotate_deg))
        transforms.append(fn.transforms.rotation(angle=angle, center=(size / 2, size / 2)))
    if cfg.translate:
        shift = cfg.translate * size
        offset = fn.random.uniform(range=(-shift, shift), shape=[2])
        transforms.append(fn.transforms.translation(offset=offset))
    if not transforms:
        return images
    matrix = transforms[0] if len(transforms) == 1 else fn.transforms.combine(*transforms)
    return fn.warp_affine(images, matrix=matrix, fill_value=0, inverse_map=False)


def _colour(images, cfg):
    kw = {}
    for name in ("brightness", "contrast", "saturation"):
        amount = getattr(cfg, name)
        if amount:
            kw[name] = fn.random.uniform(range=(1 - amount, 1 + amount))
    return fn.color_twist(images, **kw) if kw else images


def _normalize(images, cfg, *, mirror, crop=None):
    kw = {"crop": crop} if crop else {}
    return fn.crop_mirror_normalize(
        images,
        dtype=DALI_DTYPES[cfg.dtype],
        output_layout="HWC",
        mean=[m * 255 for m in cfg.mean],
        std=[s * 255 for s in cfg.std],
        mirror=mirror,
        **kw,
    )


def build_graph(encoded, cfg, device: str):
    """Decoded, augmented, normalised images (HWC float) from ENCODED (uint8 bytes).

    DEVICE is "cpu" or "gpu". Train: ROI decode fused with the random resized
    crop (or, for recipe "small", decode + pad-and-random-crop), then resize,
    rotation/translation, colour jitter, flips, normalise. Eval: decode, resize
    the shorter side, centre crop, normalise (recipe "small": resize to the
    output size, normalise).
    """
    size = cfg.image_size
    decode = _decoder_args(cfg, device)
    if not cfg.train and cfg.recipe == "small":
        images = fn.decoders.image(encoded, **decode)
        return _normalize(fn.resize(images, resize_x=size, resize_y=size), cfg, mirror=0)
    if not cfg.train:
        images = fn.decoders.image(encoded, **decode)
        images = fn.resize(images, resize_shorter=cfg.resolved_eval_resize)
        return _normalize(images, cfg, mirror=0, crop=(size, size))
    if cfg.recipe == "small":
        images = fn.decoders.image(encoded, **decode)
        images = fn.resize(images, resize_x=size, resize_y=size)
        if cfg.pad_px:
            anchor = fn.random.uniform(
                values=[float(v) for v in range(-cfg.pad_px, cfg.pad_px + 1)], shape=[2]
            )
            images = fn.slice(
                images,
                anchor,
                [float(size), float(size)],
                axis_names="HW",
                out_of_bounds_policy="pad",
                fill_values=0,
                normalized_anchor=False,
                normalized_shape=False,
            )
    else:
        images = fn.decoders.image_random_crop(
            encoded,
            **decode,
            random_area=list(cfg.scale),
            random_aspect_ratio=list(cfg.ratio),
            num_attempts=10,
        )
        images = fn.resize(images, resize_x=size, resize_y=size)
    images = _geometry(images, cfg)
    images = _colour(images, cfg)
    if cfg.vflip:
        images = fn.flip(images, horizontal=0, vertical=fn.random.coin_flip(probability=cfg.vflip))
    mirror = fn.random.coin_flip(probability=cfg.hflip) if cfg.hflip else 0
    return _normalize(images, cfg, mirror=mirror)
