"""This process's place in a ``torchrun`` job, readable from any layer.

The data layer shards its loaders by rank and the engine sets up and tears down the process
group; both need to ask "which rank am I, of how many?". That question lives here, below both, so
that :mod:`headreg.data` never imports the engine. Everything that changes the process group
(``init_distributed``, collectives) stays in :mod:`headreg.engine.runtime`, which re-exports these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["DistInfo", "dist_info"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank: Global rank, 0 in a single process.
        world_size: Number of processes, 1 in a single process.
        local_rank: Rank on this node (which GPU to use), 0 in a single process.
        is_distributed: A process group with more than one rank is initialised.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_distributed: bool = False


def dist_info() -> DistInfo:
    """Describe the current process group; a single-process ``DistInfo()`` when none is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, is_distributed=world > 1)
