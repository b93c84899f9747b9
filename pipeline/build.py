"""build_loader: pick the backend, open the dataset, wire them into a Loader."""

from __future__ import annotations

import torch

from pipeline.config import LoaderConfig
from pipeline.loader import Loader
from pipeline.world import World


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (DALI missing, no GPU)."""


def resolve_device(cfg: LoaderConfig, world: World) -> torch.device:
    """cfg.device, else cuda:<local_rank> when CUDA is available, else cpu."""
    if cfg.backend == "dali-gpu":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                "backend 'dali-gpu' needs a CUDA GPU; use 'dali-cpu' or 'torch'"
            )
        if cfg.device is not None and not str(cfg.device).startswith("cuda"):
            raise ValueError(
                f"backend 'dali-gpu' outputs on the GPU; device={cfg.device!r} conflicts"
            )
    if cfg.device is not None:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def build_loader(cfg: LoaderConfig, world: World | None = None) -> Loader:
    """The loader for CFG as seen by WORLD (default: from the environment)."""
    world = world or World.from_env()
    cfg = cfg.parallelism(world.local_world_size)
    device = resolve_device(cfg, world)
    dataset = None
    if cfg.data is not None:
        from pipeline.storage import Dataset

        dataset = Dataset.open(cfg)
    num_classes = dataset.manifest.num_classes if dataset is not None else cfg.num_classes
    if cfg.backend == "synthetic":
        from pipeline.synthetic import SyntheticBackend

        backend = SyntheticBackend(cfg, device, num_classes)
    elif cfg.cache == "device":
        from pipeline.device_cache import DeviceCacheBackend

        backend = DeviceCacheBackend(cfg, world, device, dataset)
    elif cfg.backend == "torch":
        from pipeline.torch_backend import TorchBackend

        backend = TorchBackend(cfg, device)
    else:
        from pipeline.dali_backend import DaliBackend

        m = dataset.manifest if dataset is not None else None
        backend = DaliBackend(cfg, world, device,
                              sample_bytes=m.bytes / max(1, m.samples) if m else None)  # fmt: skip
    return Loader(cfg, world, dataset=dataset, backend=backend, device=device)
