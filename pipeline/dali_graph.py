"""The DALI decode + augment graph: one function of an encoded-bytes node.

Every DALI reader calls :func:`build_graph`; the same graph runs on the CPU
(``dali-cpu``) or with nvJPEG/CUDA (``dali-gpu``, decoder device "mixed").
Augmentations mean what the torch backend's torchvision transforms mean (same
config fields). The loader's backends pass PARAMS: per-sample parameters
(:mod:`pipeline.augment`) fed beside the bytes, so DALI draws nothing and a
sample's pixels do not depend on where it lands; without them (DALI's own
``readers.webdataset`` in the benchmarks) DALI's random operators draw.

Output: HWC per sample (so the batch is NHWC, which is the channels_last
layout of an NCHW tensor: the torch side permutes the view, no copy).
"""

from __future__ import annotations

from nvidia.dali import fn, types

DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}
# NVIDIA's ResNet-50 example: room for the decoder's buffers up front, so that the first
# epochs do not reallocate as larger images arrive.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
PARAM_NAMES = ("crop", "pad_anchor", "angle", "offset", "colour", "hflip", "vflip")


def _decoder_device(device: str) -> str:
    return "mixed" if device == "gpu" else "cpu"


def _decoder_args(cfg, device: str) -> dict:
    """Keyword arguments every decoder of the graph gets."""
    args = {"device": _decoder_device(device), "output_type": types.RGB}
    if device == "gpu":
        args["device_memory_padding"] = DEVICE_MEMORY_PADDING
        args["host_memory_padding"] = HOST_MEMORY_PADDING
        if cfg.hw_decoder_load is not None:
            args["hw_decoder_load"] = cfg.hw_decoder_load  # the mixed decoder's split only
    return args


def params_used(cfg) -> tuple[str, ...]:
    """The per-sample parameters the graph of CFG reads (pipeline.augment.BatchParams)."""
    if not cfg.train:
        return ()
    used = ["crop"] if cfg.recipe != "small" else (["pad_anchor"] if cfg.pad_px else [])
    if cfg.rotate_deg:
        used.append("angle")
    if cfg.translate:
        used.append("offset")
    if cfg.brightness or cfg.contrast or cfg.saturation:
        used.append("colour")
    if cfg.vflip:
        used.append("vflip")
    if cfg.hflip:
        used.append("hflip")
    return tuple(used)


def _geometry(images, cfg, params):
    """Rotation (+-deg) and translation (+-fraction of the output) as one affine warp."""
    size = float(cfg.image_size)
    transforms = []
    if cfg.rotate_deg:
        angle = (
            params["angle"]
            if params is not None
            else fn.random.uniform(range=(-cfg.rotate_deg, cfg.rotate_deg))
        )
        transforms.append(fn.transforms.rotation(angle=angle, center=(size / 2, size / 2)))
    if cfg.translate:
        shift = cfg.translate * size
        offset = (
            params["offset"]
            if params is not None
            else fn.random.uniform(range=(-shift, shift), shape=[2])
        )
        transforms.append(fn.transforms.translation(offset=offset))
    if not transforms:
        return images
    matrix = transforms[0] if len(transforms) == 1 else fn.transforms.combine(*transforms)
    return fn.warp_affine(images, matrix=matrix, fill_value=0, inverse_map=False)


def _colour(images, cfg, params):
    if not (cfg.brightness or cfg.contrast or cfg.saturation):
        return images
    kw = {}
    for i, name in enumerate(("brightness", "contrast", "saturation")):
        amount = getattr(cfg, name)
        if not amount:
            continue
        kw[name] = (params["colour"][i] if params is not None else
                    fn.random.uniform(range=(1 - amount, 1 + amount)))  # fmt: skip
    return fn.color_twist(images, **kw)


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


def build_graph(encoded, cfg, device: str, params: dict | None = None):
    """Decoded, augmented, normalised images (HWC float) from ENCODED (uint8 bytes).

    DEVICE is "cpu" or "gpu". PARAMS: DALI nodes of the per-sample parameters
    named in :func:`params_used` (None: DALI draws them). Train: ROI decode of
    the random resized crop window (or, for recipe "small", decode + pad-and-
    random-crop), then resize, rotation/translation, colour jitter, flips,
    normalise. Eval: decode, resize the shorter side, centre crop, normalise
    (recipe "small": resize to the output size, normalise).
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
            if params is not None:
                anchor = params["pad_anchor"]
            else:
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
    elif params is not None:
        crop = params["crop"]  # x, y, w, h: the window decoded, as torchvision draws it
        images = fn.decoders.image_slice(
            encoded, crop[0:2], crop[2:4], axis_names="WH", normalized_anchor=False,
            normalized_shape=False, **decode,
        )  # fmt: skip
        images = fn.resize(images, resize_x=size, resize_y=size)
    else:
        images = fn.decoders.image_random_crop(
            encoded,
            **decode,
            random_area=list(cfg.scale),
            random_aspect_ratio=list(cfg.ratio),
            num_attempts=10,
        )
        images = fn.resize(images, resize_x=size, resize_y=size)
    images = _geometry(images, cfg, params)
    images = _colour(images, cfg, params)
    if cfg.vflip:
        vertical = (
            params["vflip"] if params is not None else fn.random.coin_flip(probability=cfg.vflip)
        )
        images = fn.flip(images, horizontal=0, vertical=vertical)
    if cfg.hflip:
        mirror = (
            params["hflip"] if params is not None else fn.random.coin_flip(probability=cfg.hflip)
        )
    else:
        mirror = 0
    return _normalize(images, cfg, mirror=mirror)
