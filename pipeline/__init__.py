"""pipeline: the read side of shardflow.

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
