"""The trainer's side of the data: DataConfig -> pipeline loaders, class counts."""

from __future__ import annotations

import torch

from pipeline import LoaderConfig, World, build_loader
from shard_tools.format import read_manifest
from train.config import DataConfig


def dataset_classes(url: str) -> dict[str, int]:
    """Class name -> label recorded in the dataset's manifest (ManifestError if it has none);
    an unlabelled dataset (image-text, self-supervised) cannot train a classifier."""
    manifest = read_manifest(url)
    if not manifest.labelled:
        raise ValueError(
            f"{url} is unlabelled (packed or adopted with --unlabelled): the trainer trains "
            "classifiers and needs labels (--label cls, --label json:FIELD, or a class list)"
        )
    if not manifest.classes:
        raise ValueError(f"{url} has no classes: it holds {manifest.samples} samples")
    return dict(manifest.classes)


def check_same_classes(
    expected: dict[str, int], expected_from: str, actual: dict[str, int], actual_from: str
) -> None:
    """Refuse two label spaces that differ in size or in which name has which label:
    a model scored against another mapping reports a meaningless accuracy."""
    if len(expected) != len(actual):
        raise ValueError(
            f"{actual_from} has {len(actual)} classes but {expected_from} has {len(expected)}"
        )
    if expected != actual:
        diff = sorted(
            k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)
        )
        raise ValueError(
            f"{actual_from} and {expected_from} label classes differently "
            f"({', '.join(diff[:3])}{'...' if len(diff) > 3 else ''})"
        )


def loader_config(
    dcfg: DataConfig,
    *,
    url: str,
    train: bool,
    per_rank_batch: int,
    image_size: int,
    seed: int,
    device: torch.device,
    num_classes: int,
) -> LoaderConfig:
    """Map the trainer's data flags onto the pipeline's LoaderConfig."""
    recipe = dcfg.recipe
    if recipe == "auto":
        # Small images (CIFAR-like) are padded and randomly cropped; large ones get
        # the random-resized-crop recipe.
        recipe = "small" if image_size <= 64 else "imagenet"
    return LoaderConfig(
        data=url or None,
        backend=dcfg.backend,
        batch_size=per_rank_batch,
        train=train,
        image_size=image_size,
        seed=seed,
        # pad: no sample is lost; evaluation removes the repeats by key.
        remainder="pad",
        recipe=recipe,
        device=str(device),
        # 0: the loader decides on a GPU; on CPU the torch workers' count, as before.
        num_threads=dcfg.dali_threads
        or (None if dcfg.backend == "dali-gpu" else max(1, dcfg.num_workers)),
        num_classes=num_classes,
        **dcfg.loader_fields(),
    )


def make_loader(lcfg: LoaderConfig, world: World):
    """build_loader with the trainer's world (global rank, world size, local rank)."""
    return build_loader(lcfg, world)
