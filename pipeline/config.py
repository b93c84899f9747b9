"""LoaderConfig: every knob of the read side, validated when it is built."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from shard_tools.format import check_url

BACKENDS = ("dali-gpu", "dali-cpu", "torch", "synthetic")
REMAINDER_POLICIES = ("pad", "drop")
RECIPES = ("imagenet", "small")
DTYPES = ("float32", "float16", "bfloat16")
CACHES = ("none", "device")
READERS = ("auto", "process", "thread")
HAND_OVERS = ("auto", "buffer", "files")
IMAGE_OR_LABEL = ("jpg", "jpeg", "png", "webp", "cls")


def _pair(name: str, value: Any, lo: float, hi: float | None = None) -> None:
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    a, b = value
    if not (lo <= a <= b) or (hi is not None and b > hi):
        bound = f"{lo} <= low <= high" + (f" <= {hi}" if hi is not None else "")
        raise ValueError(f"{name} must satisfy {bound}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """What to read, how to split it over ranks, how to decode and augment it.

    ``batch_size`` is PER RANK (the trainer derives it from its global batch).
    Augmentation fields mean the same in every backend: ``scale``/``ratio`` of
    the random resized crop (fractions of the image area / width:height),
    ``rotate_deg`` (uniform in +-deg), ``translate`` (uniform in +-fraction of
    the output size), ``hflip``/``vflip`` (probabilities), ``brightness`` /
    ``contrast`` / ``saturation`` (factor uniform in [1-x, 1+x]), ``mean``/``std``
    in [0, 1] pixel units. Eval resizes the shorter side to ``eval_resize``
    (default ``image_size / 0.875``) and centre-crops ``image_size``. The
    ``small`` recipe (CIFAR) is resize to ``image_size`` + pad-by-``pad_px`` +
    random crop + flip; its eval is the resize alone.
    """

    data: str | None = None  # dataset root written by `shard pack` (path or fsspec URL)
    backend: str = "torch"
    batch_size: int  # per rank
    train: bool = True
    image_size: int = 224
    seed: int = 0

    # distribution and shuffling
    remainder: str = "pad"  # "pad": repeat samples so no sample is lost; "drop": drop the tail
    shuffle: bool = True  # shard order + sample buffer; only applies when train=True
    shuffle_buffer: int = 4096  # samples held per rank for the in-memory shuffle
    # Samples the buffer holds before its first output; it then grows by one per output
    # to shuffle_buffer (webdataset's "initial"), so the first batch waits for about
    # 2 batches read rather than a full buffer. None: 2 * batch_size. shuffle_initial =
    # shuffle_buffer starts full (the order of versions before format 3).
    shuffle_initial: int | None = None

    # augmentation
    recipe: str = "imagenet"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotate_deg: float = 0.0
    translate: float = 0.0
    hflip: float = 0.5
    vflip: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    pad_px: int = 4
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    eval_resize: int | None = None

    # output
    dtype: str = "float32"
    device: str | None = None  # default: cuda:<local_rank> if CUDA is available, else cpu

    # parallelism
    num_workers: int = 2  # torch backend: decode processes (0 = decode in this process)
    # DALI: CPU threads of the pipeline; None: from the cores this rank has (parallelism())
    num_threads: int | None = None
    # dali-gpu: the share of JPEG decoding given to the GPU's hardware JPEG decoder
    # (A100/H100/H200), the rest going to CUDA cores; None = DALI's default (0.65).
    hw_decoder_load: float | None = None
    prefetch: int | None = None  # batches decoded ahead of the one being consumed (None: auto)
    # Where the shard reader runs for the DALI backends: "process" (its own, so that it
    # never takes the GIL from the training loop), "thread" (this one), "auto" (process).
    reader: str = "auto"
    # How the reader process hands a batch to DALI: "buffer" (the batch's images copied
    # into one shared-memory buffer, cut apart by DALI), "files" (image by image; those of
    # local shards as views of the shard files, not copied), "auto" (buffer for small
    # images and on a GPU, else files; see dali_backend.PACKED_UP_TO).
    hand_over: str = "auto"

    # storage
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    retries: int = 3  # extra attempts per read before failing
    retry_backoff_s: float = 0.5  # first wait; doubles each attempt
    # Read units fetched ahead (None: auto): in background threads, or by the kernel
    # (posix_fadvise) for local shards the reader process maps.
    read_ahead: int | None = None
    # Upper bound of one ranged read: object stores stream best at 8-16 MiB per request
    # with several in flight; it also bounds the memory of a read unit.
    max_read_mb: int = 16

    # small-image mode: decode the dataset once into a uint8 tensor on the device
    cache: str = "none"
    cache_max_gb: float = 16.0

    # members handed over as text with each sample (batch.extra["txt"]: captions, .json)
    extra_members: tuple[str, ...] = ()

    # synthetic backend
    num_classes: int = 1000  # labels drawn from 0..num_classes-1 (synthetic only)
    synthetic_samples: int = 1_281_167  # epoch size when `data` is not given

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.data is None and self.backend != "synthetic":
            raise ValueError(f"backend {self.backend!r} needs data= (a dataset root)")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise ValueError(f"data must be a non-empty path or URL string, got {self.data!r}")
        if self.data is not None:
            check_url(self.data, "data")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(
                f"batch_size (per rank) must be a positive int, got {self.batch_size!r}"
            )
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be 'pad' or 'drop', got {self.remainder!r}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.shuffle_initial is not None and self.shuffle_initial < 1:
            raise ValueError(f"shuffle_initial must be >= 1, got {self.shuffle_initial}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        _pair("scale", self.scale, 1e-6, 1.0)
        _pair("ratio", self.ratio, 1e-6)
        if not 0 <= self.rotate_deg <= 180:
            raise ValueError(f"rotate_deg must be in [0, 180], got {self.rotate_deg}")
        if not 0 <= self.translate < 1:
            raise ValueError(f"translate must be in [0, 1), got {self.translate}")
        for name in ("hflip", "vflip"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.pad_px < 0:
            raise ValueError(f"pad_px must be >= 0, got {self.pad_px}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")
        if self.eval_resize is not None and self.eval_resize < self.image_size:
            raise ValueError(
                f"eval_resize ({self.eval_resize}) must be >= image_size ({self.image_size})"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, got {self.reader!r}")
        if self.hand_over not in HAND_OVERS:
            raise ValueError(
                f"hand_over must be one of {', '.join(HAND_OVERS)}, got {self.hand_over!r}"
            )
        for name in ("num_workers", "retries") + (
            ("read_ahead",) if self.read_ahead is not None else ()
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_read_mb",) + tuple(
            n for n in ("num_threads", "prefetch") if getattr(self, n) is not None
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hw_decoder_load is not None and not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if self.retry_backoff_s < 0:
            raise ValueError(f"retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be 'none' or 'device', got {self.cache!r}")
        if self.cache == "device" and self.backend == "synthetic":
            raise ValueError("cache='device' decodes real data; the synthetic backend has none")
        if self.cache == "device" and self.train and self.recipe != "small":
            raise ValueError(
                "cache='device' augments with the small-image recipe only; set recipe='small' "
                "(pad + random crop + flip) or use a streaming backend"
            )
        if self.cache_max_gb <= 0:
            raise ValueError(f"cache_max_gb must be > 0, got {self.cache_max_gb}")
        if isinstance(self.extra_members, str | list):
            names = (
                self.extra_members.split(",")
                if isinstance(self.extra_members, str)
                else self.extra_members
            )
            object.__setattr__(self, "extra_members", tuple(names))
        object.__setattr__(
            self, "extra_members", tuple(e.strip().lower().lstrip(".") for e in self.extra_members)
        )
        if any(not e or e in IMAGE_OR_LABEL for e in self.extra_members):
            raise ValueError(
                f"extra_members names extensions of other members (txt, json, ...), got "
                f"{self.extra_members!r}; the image and .cls come as images and labels"
            )
        if self.extra_members and self.backend == "synthetic":
            raise ValueError("extra_members reads members of real samples; synthetic has none")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.synthetic_samples < 1:
            raise ValueError(f"synthetic_samples must be >= 1, got {self.synthetic_samples}")

    def parallelism(self, local_world_size: int = 1, cores: int | None = None) -> LoaderConfig:
        """This config with ``num_threads``, ``prefetch``, ``read_ahead`` and ``reader``
        decided where they were left to the loader: from the cores per local rank on a
        GPU (a node's cores shared by its GPUs' ranks), the small CPU defaults otherwise."""
        if cores is None:
            cores = (
                len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1
            )
        per_rank = max(1, cores // max(1, local_world_size))
        gpu = self.backend == "dali-gpu"
        auto = {
            # The training thread and the reader process each keep a core of their own.
            "num_threads": max(2, per_rank - 2) if gpu else 2,
            "prefetch": 3 if gpu else 2,
            "read_ahead": min(8, max(2, per_rank // 2)) if gpu else 2,
        }
        chosen = {k: v for k, v in auto.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **chosen) if chosen else self

    @property
    def shuffling(self) -> bool:
        """Whether shard order and the sample buffer are shuffled (training only)."""
        return self.train and self.shuffle

    @property
    def buffer_start(self) -> int:
        """Samples the shuffle buffer holds before its first output (0: no shuffling)."""
        if not self.shuffling or self.shuffle_buffer <= 1:
            return 0
        start = 2 * self.batch_size if self.shuffle_initial is None else self.shuffle_initial
        return min(start, self.shuffle_buffer)

    @property
    def resolved_eval_resize(self) -> int:
        return self.eval_resize or int(round(self.image_size / 0.875))
