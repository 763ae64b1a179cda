"""The distributed side of a training run: joining the process group, the per-rank batch, DDP, what ranks exchange.

Every method is the identity (or a plain call) in a single process, so the runner has no ``if distributed``
branches of its own. The generic helpers (device choice, gathering tensors of different lengths, "rank 0
acts, the others learn the outcome") live in :mod:`headreg.engine.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidValueError
from .runtime import DistInfo, init_distributed

__all__ = ["Ranks"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a training run and the collectives the run needs.

    Attributes:
        info: rank, world size, whether a process group is up.
        device: this rank's device (``cuda:LOCAL_RANK`` under torchrun on GPUs).
    """

    info: DistInfo
    device: torch.device

    @classmethod
    def join(cls, device_spec: str, batch_size: int) -> Ranks:
        """Join the group torchrun set up (none in a single process) and check the global batch divides evenly.

        Args:
            device_spec: as :func:`headreg.engine.runtime.resolve_device`.
            batch_size: the global batch, split evenly over the ranks.
        """
        info, device = init_distributed(device_spec)
        if batch_size % info.world_size:
            raise InvalidValueError(
                f"batch_size={batch_size} is the global batch and must divide evenly over {info.world_size} processes"
            )
        return cls(info, device)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.info.rank == 0

    @property
    def distributed(self) -> bool:
        return self.info.is_distributed

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` under several ranks, else ``model`` itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sum_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place; returns it."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def max_(self, t: Tensor) -> Tensor:
        """Element-wise maximum of ``t`` over the ranks, in place; returns it."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, made by this job), in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def replica_difference(self, model: nn.Module) -> float:
        """Largest difference of any weight or buffer between ranks (0.0 when DDP kept them in step)."""
        # A class-sharded head's rows differ by design (and by shape): only the replicated part is compared.
        sharded = type(getattr(model, "head", None)).__name__ == "ShardedHead"
        state = {k: t for k, t in model.state_dict().items() if not (sharded and k.startswith("head."))}
        flat = torch.cat([t.detach().double().flatten() for t in state.values()])
        hi, lo = self.max_(flat.clone()), -self.max_(-flat)
        return float((hi - lo).max()) if flat.numel() else 0.0
