"""Rank facts in one frozen value, built from the environment in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class World:
    """Where this process sits in the job.

    ``rank`` is the global rank (the shard id every assignment uses);
    ``local_rank`` picks the GPU on this node. Confusing the two is the classic
    bug that makes every node read the same data.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.local_world_size < 1:
            raise ValueError(f"local_world_size must be >= 1, got {self.local_world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local_rank {self.local_rank} is outside 0..{self.local_world_size - 1}"
            )
        if self.node_rank < 0:
            raise ValueError(f"node_rank must be >= 0, got {self.node_rank}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        """Read torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
        GROUP_RANK); a plain ``python`` process is rank 0 of a world of one."""
        env = os.environ if env is None else env

        def get(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

        world_size = get("WORLD_SIZE", 1)
        local_world_size = get("LOCAL_WORLD_SIZE", world_size)
        return cls(
            rank=get("RANK", 0),
            world_size=world_size,
            local_rank=get("LOCAL_RANK", 0),
            local_world_size=local_world_size,
            node_rank=get("GROUP_RANK", get("NODE_RANK", 0)),
        )

    def with_rank(self, rank: int) -> World:
        """The same job seen from another global rank (tests simulate ranks this way)."""
        local = rank % self.local_world_size
        return World(
            rank=rank,
            world_size=self.world_size,
            local_rank=local,
            local_world_size=self.local_world_size,
            node_rank=rank // self.local_world_size,
        )
