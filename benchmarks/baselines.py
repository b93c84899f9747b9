"""Baselines measured beside shardflow in every run.

``webdataset_loader`` is what most users run today: the ``webdataset`` library
reading tar shards, PIL decode and torchvision transforms in
``torch.utils.data.DataLoader`` workers. It is written the way its docs show,
not tuned for this project, so the ratio against it is the honest one.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transform(image_size: int, train: bool):
    from torchvision.transforms import v2

    if train:
        ops = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.Resize(int(image_size * 1.14), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [
            v2.PILToTensor(),
            *ops,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _decode(sample: dict, transform) -> tuple[torch.Tensor, int]:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in sample:
            image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
            return transform(image), int(sample["cls"])
    raise KeyError(f"sample {sample.get('__key__')} has no image member")


class _Decode:
    # A picklable callable: DataLoader workers may be spawned.
    def __init__(self, image_size: int, train: bool):
        self.transform = _transform(image_size, train)

    def __call__(self, sample: dict):
        return _decode(sample, self.transform)


def webdataset_loader(
    urls: list[str],
    *,
    batch_size: int,
    image_size: int,
    train: bool = True,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A plain webdataset + DataLoader pipeline over URLS (local paths or s3://).

    One pass over the shards, or with RESAMPLED an endless stream (each worker
    draws shards at random, as webdataset's docs advise for multi-worker
    training): worker start-up is then paid once, not once per pass.
    """
    import webdataset as wds

    if resampled:
        dataset = wds.WebDataset(
            urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node, seed=0
        )
    else:
        dataset = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False
        )
    if train and shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer)
    dataset = dataset.map(_Decode(image_size, train)).batched(batch_size, partial=True)
    loader = wds.WebLoader(
        dataset, batch_size=None, num_workers=num_workers, persistent_workers=False
    )
    return iter(loader)
