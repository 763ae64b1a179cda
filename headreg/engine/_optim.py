"""Optimiser and learning-rate schedule for the training engine.

The schedule is a pure function of the global step (:func:`lr_factor`), applied to every
parameter group before each step, so resuming needs no scheduler object: the step count
stored in the resume state is the whole of the schedule's state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InvalidValueError

__all__ = ["OPTIMIZERS", "SCHEDULES", "DEFAULT_LR", "build_optimizer", "lr_factor", "set_lr"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
#: ``step`` schedule: the learning rate is multiplied by 0.1 at these fractions of the run.
STEP_MILESTONES = (0.5, 0.75)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm/PReLU weights and a learned log-scale are 1-D or 0-D: decaying them only hurts.
    return param.ndim <= 1 or name.endswith(".bias")


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """SGD (Nesterov-free momentum) or AdamW over every trainable parameter, head included.

    Weight decay applies to matrices and convolution kernels (including the head's class
    weights and SGD-learned centres), not to biases, norm and PReLU weights or scales.

    Args:
        model: the (unwrapped) model.
        name: ``sgd`` or ``adamw``.
        lr: base learning rate.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        momentum: SGD momentum.
    """
    if name not in OPTIMIZERS:
        raise InvalidValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise InvalidValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise InvalidValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(pname, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    ``cosine``: half a cosine from 1 to 0 over the run (after warm-up); ``step``: 1, then 0.1 at
    half the run and 0.01 at three quarters; ``constant``: 1. A linear warm-up from ``1/warmup``
    to 1 over the first ``warmup_steps`` precedes all three.
    """
    if schedule not in SCHEDULES:
        raise InvalidValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    total = max(1, total_steps - warmup_steps)
    t = min(max(step - warmup_steps, 0), total) / total
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.1 ** sum(t >= m for m in STEP_MILESTONES)
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
