"""The one batch type every backend returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Batch:
    """``images``: float NCHW tensor in channels_last memory format on the target
    device; ``labels``: int64 on the same device; ``keys``: the sample key of
    each row (a row that replaced a corrupt sample repeats a valid key);
    ``skipped``: keys of corrupt samples replaced in this batch."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    skipped: tuple[str, ...] = ()
    # LoaderConfig.extra_members: extension -> one str per row (UTF-8 text; None where
    # the sample has no such member), in the order of KEYS.
    extra: dict[str, list[str | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True, kw_only=True)
class EpochReport:
    """What this rank's loader handed out in the current epoch.

    ``keys`` in yield order (only batches yielded by this loader object, so a
    resumed loader reports from its resume point); ``repeated``: samples that
    were pad repeats (this rank); ``dropped``: samples of the epoch that no rank
    reads under the drop policy (all ranks, every split of an elastically resumed
    epoch included); ``corrupt``: keys skipped as
    corrupt and replaced by a valid sample of the same batch; ``retries``:
    shard/index reads this process retried after an error while yielding this
    epoch's batches (retries inside the storage client itself are not seen).
    """

    epoch: int
    rank: int
    world_size: int
    steps: int
    keys: tuple[str, ...]
    repeated: int
    dropped: int
    corrupt: tuple[str, ...]
    retries: int = 0

    @property
    def samples(self) -> int:
        return len(self.keys)
