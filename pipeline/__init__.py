"""pipeline: the read side of shardflow.

Where things live: the public API (``build_loader``, ``LoaderConfig``,
``World``, ``Batch``) in ``build``, ``config``, ``world`` and ``batch``; who
reads which samples in which order (pure functions of sample counts, seed,
epoch and world) in ``assign`` and ``order``; epochs, steps, resume state and
accounting in ``loader``; reading shards (ranged reads, retries) in
``storage`` and handing out encoded batches in planned order in ``reader``
(with the byte checks of ``sanity``); decoding in one backend each
(``dali_backend`` + ``dali_graph``, ``torch_backend``, ``device_cache``,
``synthetic``). The shard format itself comes from ``shard_tools.format``.

from pipeline import LoaderConfig, World, build_loader
loader = build_loader(LoaderConfig(data=..., backend="dali-gpu", batch_size=256), World.from_env())
for epoch in range(epochs):
    loader.set_epoch(epoch)
    for batch in loader:   # len(loader) batches, equal on every rank
        batch.images, batch.labels, batch.keys
"""

from pipeline.batch import Batch, EpochReport
from pipeline.build import build_loader
from pipeline.config import LoaderConfig
from pipeline.loader import Loader
from pipeline.world import World

__all__ = ["Batch", "EpochReport", "Loader", "LoaderConfig", "World", "build_loader"]
