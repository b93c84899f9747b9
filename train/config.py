"""Run configuration: frozen dataclasses that validate themselves, and the one argv parser.

Values come from three layers, later ones winning: the dataclass defaults, an
optional ``--config FILE.toml`` (or a ``config.json`` written by an earlier run),
then command-line flags. Every field is a flag of the same name (``lr`` ->
``--lr``); a config file uses one table per section (``[data]``, ``[model]``,
``[optim]``, ``[run]``) and an unknown section or key is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


BACKENDS = ("dali-gpu", "dali-cpu", "torch", "synthetic")
DTYPES = ("float32", "float16", "bfloat16")
TRANSFER_MODES = ("features", "finetune")


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that is also a documented command-line flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float | None = None) -> None:
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}; got {value}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    data: str = _opt("", "training dataset: a folder or fsspec URL written by `shard pack`")
    val_data: str = _opt("", "validation dataset URL (default: none, no evaluation)")
    backend: str = _opt("dali-cpu", "loader backend (default: %(default)s)", choices=BACKENDS)
    image_size: int = _opt(0, "input side in pixels (default: 0 = the model's native size)")
    # -- parallelism and reading (per rank)
    num_workers: int = _opt(
        2, "torch backend: decode processes per rank, 0 = decode in the training process "
        "(default: %(default)s)",
    )  # fmt: skip
    dali_threads: int = _opt(
        0, "DALI backends: CPU threads per rank (default: 0 = on a GPU from the cores per local "
        "rank, on CPU --num-workers, at least 1)",
    )  # fmt: skip
    prefetch: int | None = _opt(
        None, "batches decoded ahead of the one being trained on (default: 3 on a GPU, 2 on CPU)"
    )
    read_ahead: int | None = _opt(
        None, "shard reads ahead of the one being used, per rank: in background threads, or "
        "by the kernel's read-ahead for local shards the reader process maps (default: on a "
        "GPU half the cores per local rank, 2 to 8; on CPU 2)",
    )  # fmt: skip
    reader: str = _opt(
        "auto", "where the shard reader runs: process = its own (never takes the GIL from "
        "training), thread = the training process (default: auto = process for DALI)",
        choices=("auto", "process", "thread"),
    )  # fmt: skip
    hand_over: str = _opt(
        "auto", "how the reader process hands batches to DALI: buffer = one shared-memory "
        "buffer per batch, files = image by image, local shards' images read in place "
        "(default: auto = buffer for small images and on a GPU, else files)",
        choices=("auto", "buffer", "files"),
    )  # fmt: skip
    max_read_mb: int = _opt(16, "largest single ranged read of a shard, MiB (default: %(default)s)")
    retries: int = _opt(3, "extra attempts of a failed shard read (default: %(default)s)")
    retry_backoff_s: float = _opt(
        0.5, "seconds before the first retry, doubling each time (default: %(default)s)"
    )
    hw_decoder_load: float | None = _opt(
        None,
        "dali-gpu: share of JPEG decoding on the hardware decoder, 0..1 (default: DALI's 0.65)",
    )
    dtype: str = _opt(
        "float32", "batch image dtype; float16 halves what the loader writes, autocast "
        "takes it as it is (default: %(default)s)", choices=DTYPES,
    )  # fmt: skip
    # -- order
    shuffle: bool = _opt(True, "shuffle shard order and samples in training (default: %(default)s)")
    shuffle_buffer: int = _opt(
        4096, "samples per rank in the shuffle buffer (default: %(default)s)"
    )
    shuffle_initial: int | None = _opt(
        None, "samples the shuffle buffer holds before its first output; it grows by one per "
        "output to --shuffle-buffer (default: 2 x the per-rank batch; = --shuffle-buffer "
        "starts it full, as versions before it did)",
    )  # fmt: skip
    # -- augmentation (training only; the same meaning on every backend)
    recipe: str = _opt(
        "auto",
        "augmentation: small = pad+crop+flip, imagenet = random resized crop+flip; "
        "auto picks small for <= 64 px (default: %(default)s)",
        choices=("auto", "small", "imagenet"),
    )
    hflip: float = _opt(0.5, "horizontal flip probability in training (default: %(default)s)")
    vflip: float = _opt(0.0, "vertical flip probability in training (default: %(default)s)")
    rotate_deg: float = _opt(
        0.0, "random rotation, uniform in +-DEG degrees, 0..180 (default: 0 = off)"
    )
    translate: float = _opt(
        0.0, "random translation, uniform in +-FRACTION of the image side, 0..1 (default: 0 = off)"
    )
    scale: tuple[float, float] = _opt(
        (0.08, 1.0), "imagenet recipe: crop area as a fraction of the image, LOW,HIGH "
        "(default: 0.08,1.0)",
    )  # fmt: skip
    ratio: tuple[float, float] = _opt(
        (3 / 4, 4 / 3), "imagenet recipe: crop aspect ratio (width/height), LOW,HIGH "
        "(default: 0.75,1.333)",
    )  # fmt: skip
    pad_px: int = _opt(
        4, "small recipe: zero padding before the random crop, pixels (default: %(default)s)"
    )
    brightness: float = _opt(
        0.0, "colour jitter: brightness factor in 1+-X, 0..1 (default: 0 = off)"
    )
    contrast: float = _opt(0.0, "colour jitter: contrast factor in 1+-X, 0..1 (default: 0 = off)")
    saturation: float = _opt(
        0.0, "colour jitter: saturation factor in 1+-X, 0..1 (default: 0 = off)"
    )
    mean: tuple[float, float, float] = _opt(
        (0.485, 0.456, 0.406), "per-channel mean subtracted, in [0, 1] pixel units, R,G,B "
        "(default: ImageNet's 0.485,0.456,0.406)",
    )  # fmt: skip
    std: tuple[float, float, float] = _opt(
        (0.229, 0.224, 0.225), "per-channel std divided by, R,G,B (default: ImageNet's "
        "0.229,0.224,0.225)",
    )  # fmt: skip
    eval_resize: int | None = _opt(
        None, "evaluation: resize the shorter side to this, then centre-crop --image-size "
        "(default: image size / 0.875)",
    )  # fmt: skip
    # -- caching and synthetic data
    cache: str = _opt(
        "none",
        "device = decode the dataset once into device memory (small images)",
        choices=("none", "device"),
    )
    cache_max_gb: float = _opt(16.0, "largest device cache, GiB per rank (default: %(default)s)")
    synthetic_samples: int = _opt(
        4096, "samples per epoch of the synthetic backend (default: %(default)s)"
    )

    def __post_init__(self) -> None:
        _check_choice("--backend", self.backend, BACKENDS)
        if not self.data and self.backend != "synthetic":
            raise ValueError("--data is required (a dataset folder or URL written by `shard pack`)")
        _check_range("--image-size", self.image_size, 0)
        _check_range("--num-workers", self.num_workers, 0)
        _check_range("--dali-threads", self.dali_threads, 0)
        _check_choice("--recipe", self.recipe, ("auto", "small", "imagenet"))
        _check_range("--shuffle-buffer", self.shuffle_buffer, 0)
        if self.shuffle_initial is not None:
            _check_range("--shuffle-initial", self.shuffle_initial, 1)
        _check_choice("--cache", self.cache, ("none", "device"))
        _check_range("--synthetic-samples", self.synthetic_samples, 1)
        for name in ("scale", "ratio", "mean", "std"):  # a config file gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        # Everything else is checked by the loader's own config, in its words: the same
        # rules everywhere, named here by the flag that sets them.
        try:
            self.loader_fields_check()
        except ValueError as exc:
            raise ValueError(_as_flag(str(exc))) from None

    def loader_fields(self) -> dict[str, Any]:
        """The fields that map one to one onto pipeline.LoaderConfig."""
        names = ("prefetch", "read_ahead", "reader", "hand_over", "max_read_mb", "retries",
                 "retry_backoff_s",
                 "hw_decoder_load", "dtype", "shuffle", "shuffle_buffer", "shuffle_initial", "hflip",
                 "vflip",
                 "rotate_deg", "translate", "scale", "ratio", "pad_px", "brightness", "contrast",
                 "saturation", "mean", "std", "eval_resize", "cache", "cache_max_gb",
                 "synthetic_samples", "num_workers")  # fmt: skip
        return {n: getattr(self, n) for n in names}

    def loader_fields_check(self) -> None:
        from pipeline import LoaderConfig

        recipe = "imagenet" if self.recipe == "auto" else self.recipe
        cache_recipe = "small" if self.cache == "device" else recipe
        LoaderConfig(data=self.data or None, backend=self.backend, batch_size=1,
                     image_size=max(1, self.image_size or 1), recipe=cache_recipe,
                     num_threads=max(1, self.dali_threads or self.num_workers),
                     **{**self.loader_fields(), "eval_resize": None})  # fmt: skip
        if self.eval_resize is not None and self.eval_resize < 1:
            raise ValueError(f"eval_resize must be >= 1, got {self.eval_resize}")


def _as_flag(message: str) -> str:
    """A loader message that starts with a field name, with the flag's name instead."""
    head, sep, rest = message.partition(" ")
    if sep and head.isidentifier() and head == head.lower():
        return f"--{head.replace('_', '-')} {rest}"
    return message


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model: str = _opt(
        "seed_cnn",
        "network: seed_cnn, cifar_fast, cifar_fast_s, resnet18, resnet50 (default: %(default)s)",
    )
    num_classes: int = _opt(0, "class count (default: 0 = read from the dataset manifest)")
    cifar_stem: bool = _opt(
        False, "ResNets: 3x3 stem without max-pool, for 32 px inputs (default: %(default)s)"
    )
    channels_last: bool = _opt(
        True, "NHWC memory format for model and inputs (default: %(default)s)"
    )
    compile: bool = _opt(False, "wrap the model in torch.compile (default: %(default)s)")
    init_from: str = _opt(
        "", "start from these weights: a checkpoint or plain state_dict file (any fsspec URL)"
    )
    transfer: str = _opt(
        "finetune",
        "with --init-from: features = freeze the backbone, train the classifier; finetune = train "
        "all, backbone lr x --backbone-lr-mult (default: %(default)s)",
        choices=TRANSFER_MODES,
    )
    backbone_lr_mult: float = _opt(
        0.1, "finetune: backbone lr = --lr x this (default: %(default)s)"
    )
    head_lr_mult: float = _opt(
        1.0,
        "with --init-from: classifier lr = --lr x this; a new head on frozen features often "
        "wants more (default: %(default)s)",
    )
    keep_masks: bool = _opt(
        False, "re-apply the pruning masks of --init-from after every optimizer step"
    )

    def __post_init__(self) -> None:
        from train.models import MODELS  # late: models imports torch, config must stay light

        _check_choice("--model", self.model, tuple(MODELS))
        _check_range("--num-classes", self.num_classes, 0)
        _check_choice("--transfer", self.transfer, TRANSFER_MODES)
        if not self.backbone_lr_mult > 0:
            raise ValueError(f"--backbone-lr-mult must be > 0; got {self.backbone_lr_mult}")
        if not self.head_lr_mult > 0:
            raise ValueError(f"--head-lr-mult must be > 0; got {self.head_lr_mult}")
        if self.keep_masks and not self.init_from:
            raise ValueError("--keep-masks needs --init-from (a checkpoint written by train.prune)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    optimizer: str = _opt(
        "sgd", "sgd (momentum) or adamw (default: %(default)s)", choices=("sgd", "adamw")
    )
    lr: float = _opt(0.1, "peak learning rate for the global batch (default: %(default)s)")
    momentum: float = _opt(0.9, "SGD momentum / AdamW beta1 (default: %(default)s)")
    nesterov: bool = _opt(True, "Nesterov momentum for SGD (default: %(default)s)")
    weight_decay: float = _opt(
        5e-4, "decoupled for AdamW; never applied to norms or biases (default: %(default)s)"
    )
    schedule: str = _opt(
        "cosine",
        "lr schedule after warm-up (default: %(default)s)",
        choices=("cosine", "onecycle", "constant"),
    )
    warmup_epochs: float = _opt(0.0, "linear warm-up length in epochs (default: %(default)s)")
    min_lr_ratio: float = _opt(0.0, "final lr as a fraction of --lr (default: %(default)s)")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing (default: %(default)s)")
    ema_decay: float = _opt(
        0.0, "EMA of weights per step, evaluated beside the model (default: 0 = off)"
    )
    grad_clip_norm: float = _opt(0.0, "clip the global gradient norm (default: 0 = off)")
    teacher: str = _opt("", "distil from this checkpoint's model (default: none)")
    kd_alpha: float = _opt(
        0.5, "distillation: weight of the teacher term, in [0, 1] (default: %(default)s)"
    )
    kd_temperature: float = _opt(
        4.0, "distillation: softmax temperature, > 0 (default: %(default)s)"
    )

    def __post_init__(self) -> None:
        _check_choice("--optimizer", self.optimizer, ("sgd", "adamw"))
        _check_choice("--schedule", self.schedule, ("cosine", "onecycle", "constant"))
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        _check_range("--momentum", self.momentum, 0.0, 1.0)
        _check_range("--weight-decay", self.weight_decay, 0.0)
        _check_range("--warmup-epochs", self.warmup_epochs, 0.0)
        _check_range("--min-lr-ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range("--label-smoothing", self.label_smoothing, 0.0, 1.0)
        _check_range("--ema-decay", self.ema_decay, 0.0, 1.0)
        if self.ema_decay == 1.0:
            raise ValueError("--ema-decay must be < 1 (1 would never move the average)")
        _check_range("--grad-clip-norm", self.grad_clip_norm, 0.0)
        _check_range("--kd-alpha", self.kd_alpha, 0.0, 1.0)
        if not self.kd_temperature > 0:
            raise ValueError(f"--kd-temperature must be > 0; got {self.kd_temperature}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("--nesterov needs --momentum > 0 (or pass --no-nesterov)")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    out: str = _opt("", "run directory (local path or fsspec URL) for config, metrics, checkpoints")
    epochs: int = _opt(10, "training epochs (default: %(default)s)")
    batch_size: int = _opt(
        256, "GLOBAL batch size per optimizer step, all ranks (default: %(default)s)"
    )
    grad_accum: int = _opt(1, "micro-batches per optimizer step (default: %(default)s)")
    max_steps: int = _opt(0, "stop after this many optimizer steps (default: 0 = no cap)")
    seed: int = _opt(0, "base seed for weights, data order and augmentation (default: %(default)s)")
    precision: str = _opt(
        "auto",
        "auto = bf16 autocast on GPU, fp32 on CPU (default: %(default)s)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    deterministic: bool = _opt(False, "deterministic kernels (slower; for exact resume checks)")
    eval_every_epochs: int = _opt(
        1, "evaluate every N epochs, and after the last (default: %(default)s; 0 = only at end)"
    )
    eval_every_steps: int = _opt(0, "also evaluate every N optimizer steps (default: 0 = off)")
    ckpt_every_steps: int = _opt(
        0, "checkpoint every N steps as well as each epoch end (default: 0 = epoch ends only)"
    )
    keep_checkpoints: int = _opt(3, "newest checkpoints kept (default: %(default)s)")
    resume: str = _opt(
        "", "'auto' = newest complete checkpoint in RUN_DIR if any, or a checkpoint path"
    )
    log_every_steps: int = _opt(50, "metrics line every N steps (default: %(default)s)")
    audit_keys: bool = _opt(
        False, "write every step's sample keys to RUN_DIR/audit/keys-rankR.jsonl"
    )
    tensorboard: bool = _opt(
        False, "also write TensorBoard events to RUN_DIR/tb (needs tensorboard)"
    )
    device: str = _opt(
        "auto", "auto = cuda if available (default: %(default)s)", choices=("auto", "cpu", "cuda")
    )
    dist_backend: str = _opt(
        "auto",
        "process group backend; auto = nccl on GPU, gloo on CPU",
        choices=("auto", "nccl", "gloo"),
    )
    dist_timeout_s: int = _opt(600, "collective timeout in seconds (default: %(default)s)")

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("--out is required (the run directory)")
        for name in ("epochs", "batch_size", "grad_accum", "log_every_steps", "dist_timeout_s"):
            _check_range("--" + name.replace("_", "-"), getattr(self, name), 1)
        for name in (
            "max_steps",
            "eval_every_epochs",
            "eval_every_steps",
            "ckpt_every_steps",
            "keep_checkpoints",
        ):
            _check_range("--" + name.replace("_", "-"), getattr(self, name), 0)
        _check_choice("--precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_choice("--device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("--dist-backend", self.dist_backend, ("auto", "nccl", "gloo"))
        if self.keep_checkpoints == 0 and self.resume:
            raise ValueError("--resume needs --keep-checkpoints >= 1")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything one training run needs; ``per_rank_batch`` is derived, not stored."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    run: RunConfig

    def __post_init__(self) -> None:
        if self.data.backend == "synthetic" and self.model.num_classes == 0 and not self.data.data:
            raise ValueError("the synthetic backend without --data needs --num-classes")

    def per_rank_batch(self, world_size: int) -> int:
        """Micro-batch each rank loads: global batch / (world_size * grad_accum), exactly."""
        denom = world_size * self.run.grad_accum
        if self.run.batch_size % denom:
            raise ValueError(
                f"--batch-size {self.run.batch_size} is not divisible by world_size {world_size} "
                f"x --grad-accum {self.run.grad_accum}"
            )
        return self.run.batch_size // denom

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """All values, with credentials in URLs redacted (this is what runs record)."""
        from shard_tools.format import redact

        return {
            name: {
                k: redact(v) if isinstance(v, str) else v
                for k, v in asdict(getattr(self, name)).items()
            }
            for name in SECTIONS
        }

    def write_json(self, path: str) -> None:
        """Write the resolved config (all sections, all values) as JSON; fsspec paths work."""
        import fsspec

        with fsspec.open(path, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _field_index() -> dict[str, tuple[str, Any]]:
    """flag-style name -> (section, dataclass field), checked unique across sections."""
    index: dict[str, tuple[str, Any]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f)
    return index


# Field types the flags and config files take (the annotations, as strings).
_TUPLES = {"tuple[float, float]": 2, "tuple[float, float, float]": 3}
_OPTIONAL = {"int | None": "int", "float | None": "float"}


def _kind(f: Any) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _number(kind: str, value: Any) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coerce(where: str, f: Any, value: Any) -> Any:
    """Check a value from a config file against the field's type (ints are fine for floats)."""
    kind = _kind(f)
    if kind in _TUPLES:
        n = _TUPLES[kind]
        if not (
            isinstance(value, list | tuple)
            and len(value) == n
            and all(_number("float", v) for v in value)
        ):
            raise ValueError(f"{where} must be a list of {n} numbers; got {value!r}")
        return tuple(float(v) for v in value)
    if kind in _OPTIONAL and value is None:  # config.json writes null; TOML leaves it out
        return None
    kind = _OPTIONAL.get(kind, kind)
    ok = {
        "bool": isinstance(value, bool),
        "int": _number("int", value),
        "float": _number("float", value),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ValueError(f"{where} must be a {kind}; got {value!r}")
    return float(value) if kind == "float" else value


def _numbers(n: int):
    """argparse type: N comma-separated numbers (``0.08,1.0``)."""

    def parse(text: str) -> tuple[float, ...]:
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {n} comma-separated numbers: {text!r}") from None
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return values

    return parse


def load_config_file(path: str) -> dict[str, dict[str, Any]]:
    """Read a TOML preset (or a run's config.json) into {section: {field: value}}, strictly."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "JSON" if p.suffix == ".json" else "TOML"
        raise ValueError(f"--config {path} is not valid {kind}: {exc}") from None
    out: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ValueError(
                f"--config {path}: unknown section [{section}] (known: {', '.join(SECTIONS)})"
            )
        if not isinstance(values, dict):
            raise ValueError(f"--config {path}: [{section}] must be a table")
        known = {f.name: f for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                raise ValueError(
                    f"--config {path}: unknown key {section}.{key} (known: {', '.join(known)})"
                )
            out.setdefault(section, {})[key] = _coerce(
                f"{path}: {section}.{key}", known[key], value
            )
    return out


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line instead of a full usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "train") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog,
        description="Train an image classifier on shardflow shards; run under torchrun or alone.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override lower layers
    )
    parser.add_argument(
        "--config", help="TOML preset (or an earlier run's config.json); flags override it"
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _kind(f)
            help_text = f.metadata["help"].replace("%(default)s", str(f.default))
            if kind == "bool":
                group.add_argument(
                    flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
                )
            elif kind in _TUPLES:
                group.add_argument(flag, dest=f.name, type=_numbers(_TUPLES[kind]),
                                   metavar=",".join(["X"] * _TUPLES[kind]), help=help_text)  # fmt: skip
            else:
                group.add_argument(
                    flag,
                    dest=f.name,
                    type={"int": int, "float": float, "str": str}[_OPTIONAL.get(kind, kind)],
                    choices=f.metadata["choices"],
                    help=help_text,
                )
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "train") -> Config:
    """Turn argv into a validated Config: defaults < --config file < flags.

    Raises ValueError (with the reason) for invalid values; argparse exits with
    status 2 for malformed flags.
    """
    ns = vars(build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv))
    layered: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    config_file = ns.pop("config", None)
    if config_file:
        for section, values in load_config_file(config_file).items():
            layered[section].update(values)
    index = _field_index()
    for name, value in ns.items():
        layered[index[name][0]][name] = value
    return Config(**{s: SECTIONS[s](**layered[s]) for s in SECTIONS})


def with_overrides(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of CFG with some fields of some sections replaced (re-validated)."""
    return replace(cfg, **{s: replace(getattr(cfg, s), **v) for s, v in sections.items()})
