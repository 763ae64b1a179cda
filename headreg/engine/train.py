"""Training: any registered backbone and head on any dataset headreg reads, in one process or under torchrun.

``train(TrainConfig(...), out)`` trains and writes a run directory (see :mod:`headreg.engine._rundir`);
``resume(run_dir)`` continues a stopped run exactly where it stopped. Under ``torchrun`` the model is
wrapped in ``DistributedDataParallel``; ``batch_size`` is the **global** batch, split evenly over the
ranks, and each rank reads a disjoint shard of every global batch, so N processes take the same steps
as one process with the same batch size (up to float summation order, and batch-norm statistics,
which are per rank).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError
from ._config import TrainConfig, TrainResult
from ._feasibility import MarginFeasibilityWarning, TrainingWarning, class_separation, margin_feasibility
from ._rundir import RUN_LAYOUT, RunDir
from ._runner import run_training

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "resume",
    "MarginFeasibilityWarning",
    "TrainingWarning",
    "class_separation",
    "margin_feasibility",
]


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a model as ``config`` says and write the run directory ``out``.

    Args:
        config: the run.
        out: run directory; must be new or empty unless ``overwrite``.
        overwrite: replace a run already in ``out``.
        stop_after_steps: stop (resumably) once this many optimiser steps are done, as Ctrl-C would.
        on_step: called with the global step after every step (tests, custom logging).
        progress: tqdm bars and per-epoch lines on stderr (rank 0).
        log: where lines go instead of stderr.

    Returns:
        A :class:`TrainResult`.
    """
    return run_training(
        config, Path(out), resume=False, overwrite=overwrite, stop_after_steps=stop_after_steps, on_step=on_step,
        progress=progress, log=log,
    )  # fmt: skip


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    device: str | None = None,
    stop_after_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    verify: bool = True,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its resumable state, with the same config.

    Args:
        run_dir: a directory written by :func:`train`.
        epochs: a new total epoch count (extends a finished run; changes the schedule, so the
            continuation is then not the run an uninterrupted longer run would have been).
        device: run on another device than the original.
        stop_after_steps, on_step, progress, log: as :func:`train`.
        verify: check the state's tensors against their recorded SHA-256 (``--no-verify``: False).
    """
    run_dir = Path(run_dir)
    if run_dir.is_dir() and not any(not RUN_LAYOUT.leftover(p) for p in run_dir.iterdir()):
        raise CheckpointError(
            f"--resume {run_dir}: the run there stopped before it wrote anything to continue from; start it "
            f"again with the same `headreg train ... --out {run_dir}` (no --overwrite needed)"
        )
    config = TrainConfig.from_dict(RunDir(run_dir).read_record()["config"])
    if epochs is not None:
        config.epochs = epochs
        config.__post_init__()
    if device is not None:
        config.device = device
    return run_training(
        config, run_dir, resume=True, overwrite=False, stop_after_steps=stop_after_steps, on_step=on_step,
        progress=progress, log=log, verify=verify,
    )  # fmt: skip
