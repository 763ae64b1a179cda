"""Where code runs: device resolution and thin helpers around torch.distributed for ``torchrun``.

Every helper is a no-op (or the identity) in a single process, so the same training and evaluation code runs
under ``python`` and under ``torchrun --nproc_per_node=N``. :class:`DistInfo` and :func:`dist_info` are
defined in :mod:`headreg._runtime`, below the data layer that shards by rank, and re-exported here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from headreg._runtime import DistInfo, dist_info
from headreg.errors import HeadregError, InvalidValueError

__all__ = [
    "DistInfo",
    "all_gather_variable",
    "autocast",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "comm_device",
    "dist_info",
    "init_distributed",
    "is_main_process",
    "resolve_device",
    "run_on_main",
]

T = TypeVar("T")

_MAX_DIMS = 8  # shapes are exchanged as fixed-length tensors so that mismatches fail loudly instead of hanging


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn a device spec into a ``torch.device`` that is actually available.

    Args:
        spec: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, or a
            ``torch.device``.

    Returns:
        The device.

    Raises:
        InvalidValueError: an unparsable spec, or a device that this machine does not have.
    """
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec.strip() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {spec!r}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError(
                f"device {str(device)!r} requested but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidValueError(
                f"device {str(device)!r} requested but this machine has {count} CUDA device(s) "
                f"(cuda:0 .. cuda:{count - 1})"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise InvalidValueError(f"device {str(device)!r} requested but MPS is not available; use 'cpu' or 'auto'")
        return device
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if callable(available) and available():
        return device
    raise InvalidValueError(
        f"device {str(device)!r} is not available; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    )


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context for ``dtype=None`` (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def init_distributed(device_spec: str | torch.device = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` set up through its environment variables.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With a world size of 1
    (or none set) nothing is initialised. On CUDA each process takes ``cuda:LOCAL_RANK`` and the NCCL backend;
    otherwise gloo. Calling it again once initialised returns the current state.

    Args:
        device_spec: As :func:`resolve_device`.

    Returns:
        ``(DistInfo, device)``.

    Raises:
        InvalidValueError: malformed or missing torchrun variables, or a device this machine lacks.
    """
    device = resolve_device(device_spec)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InvalidValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return dist_info(), device
    if not dist.is_available():
        raise InvalidValueError(f"WORLD_SIZE={world} but this torch build has no torch.distributed support")

    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing and not dist.is_initialized():
        raise InvalidValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with `torchrun --nproc_per_node=N ...`"
        )
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise InvalidValueError(
            f"RANK and LOCAL_RANK must be integers, got RANK={os.environ.get('RANK')!r}, "
            f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}"
        ) from None

    if device.type == "cuda":
        if device.index is None:
            # One GPU per process, chosen by the node-local rank.
            device = resolve_device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return dist_info(), device


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that prints, plots and writes files."""
    return dist_info().rank == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if not dist_info().is_distributed:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def comm_device() -> torch.device:
    """Where tensors go for a collective: the current GPU under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate, in rank order, tensors whose first dimension differs across ranks.

    Each rank pads its tensor to the largest first dimension for one ``all_gather`` and the padding is cut off
    again. Other dimensions and the dtype must agree across ranks. In a single process the input is returned.

    Args:
        tensor: ``(n_r, *rest)`` on this rank, on the backend's device (CUDA for NCCL, CPU for gloo).

    Returns:
        ``(sum_r n_r, *rest)``, rows of rank 0 first.

    Raises:
        InvalidValueError: a 0-d tensor, or trailing shapes that disagree between ranks.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0:
        raise InvalidValueError(f"tensor must have at least one dimension, got {tensor!r:.80}")
    if not dist_info().is_distributed:
        return tensor
    if tensor.ndim > _MAX_DIMS:
        raise InvalidValueError(f"tensor must have at most {_MAX_DIMS} dimensions, got {tensor.ndim}")
    world = dist.get_world_size()
    shape = torch.zeros(_MAX_DIMS + 1, dtype=torch.long, device=tensor.device)
    shape[0] = tensor.ndim
    shape[1 : tensor.ndim + 1] = torch.tensor(tensor.shape, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_l = [s.tolist() for s in shapes]
    dims = [s[1 : s[0] + 1] for s in shapes_l]
    if any(d[1:] != dims[0][1:] for d in dims):
        raise InvalidValueError(
            f"all_gather_variable needs equal trailing shapes on every rank, got {[tuple(d) for d in dims]}"
        )
    sizes = [d[0] for d in dims]
    # Bool all_gather is not supported by every backend; uint8 carries the same bits.
    work = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    padded = work.new_zeros((max(sizes), *work.shape[1:]))
    padded[: work.shape[0]] = work
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    out = torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)])
    return out.to(torch.bool) if tensor.dtype == torch.bool else out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank; returns it unchanged in a single process.

    Only for objects produced by this job's own processes (it pickles under the hood).
    """
    info = dist_info()
    if not info.is_distributed:
        return obj
    if not 0 <= src < info.world_size:
        raise InvalidValueError(f"src must lie in [0, {info.world_size}), got {src}")
    holder = [obj if info.rank == src else None]
    dist.broadcast_object_list(holder, src=src, device=comm_device())
    return holder[0]


def run_on_main(fn: Callable[[], T], *, share: bool = True) -> T | None:
    """Call ``fn`` on rank 0 only; every other rank learns whether it worked (and, with ``share``, its result).

    The one place for "rank 0 acts, the others wait for the outcome": a directory check, a file read, metrics
    computed once. A :class:`~headreg.errors.HeadregError` raised on rank 0 is raised on every rank, so no rank
    waits forever in a later collective; any other exception is re-raised on rank 0 and reported to the
    others as a ``HeadregError`` naming it. In a single process this is ``fn()``.

    Args:
        fn: The work; runs on rank 0 only.
        share: Broadcast ``fn``'s result (picklable, produced by this job) to every rank. False sends only
            success or failure, for results that are large or only rank 0 needs: the others then get None.

    Returns:
        ``fn()``'s result on rank 0; the same on the others with ``share``, else None.
    """
    info = dist_info()
    if not info.is_distributed:
        return fn()
    outcome: tuple[str, Any] | None = None
    failure: BaseException | None = None
    result: Any = None
    if info.rank == 0:
        try:
            result = fn()
            outcome = ("ok", result if share else None)
        except HeadregError as exc:
            failure, outcome = exc, ("error", exc)
        except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised as it was
            failure, outcome = exc, ("failed", f"{type(exc).__name__}: {exc}")
    outcome = broadcast_object(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] == "error":
        raise outcome[1]
    if outcome[0] == "failed":
        raise HeadregError(f"rank 0 failed: {outcome[1]}")
    return result if info.rank == 0 else outcome[1]


def cleanup_distributed() -> None:
    """Destroy the process group if one is initialised; safe to call always.

    Unreachable objects are collected first: a DistributedDataParallel wrapper and the collectives' work
    objects sit in reference cycles, and left to the interpreter's shutdown, gloo's threads can release them
    after Python is gone, which aborts the process ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()
