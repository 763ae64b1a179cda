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

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "DEFAULT_LR",
    "backbone_parameters",
    "build_optimizer",
    "lr_factor",
    "set_lr",
    "warmup_value",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
#: ``step`` schedule: the learning rate is multiplied by 0.1 at these fractions of the run.
STEP_MILESTONES = (0.5, 0.75)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm/PReLU weights and a learned log-scale are 1-D or 0-D: decaying them only hurts.
    return param.ndim <= 1 or name.endswith(".bias")


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    head_lr_scale: float = 1.0,
    backbone_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """SGD (Nesterov-free momentum) or AdamW over every trainable parameter, head included.

    Weight decay applies to matrices and convolution kernels (including the head's class
    weights and SGD-learned centres), not to biases, norm and PReLU weights or scales.
    Each parameter group carries an ``lr_scale`` that :func:`set_lr` multiplies in:
    ``head_lr_scale`` for the head's parameters and the model's embedding layer
    (``model.embedding_layer()``), ``backbone_lr_scale`` for the rest of the backbone
    (:func:`backbone_parameters`), 1 for the rest (the neck's batch norm).

    Args:
        model: the (unwrapped) model.
        name: ``sgd`` or ``adamw``.
        lr: base learning rate.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        momentum: SGD momentum.
        head_lr_scale: learning-rate multiplier of the head and the embedding layer.
        backbone_lr_scale: learning-rate multiplier of the backbone's other parameters (fine-tuning a
            pretrained backbone more gently than the new head).
    """
    if name not in OPTIMIZERS:
        raise InvalidValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise InvalidValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise InvalidValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    # Each trainable parameter falls in one of three kinds: 0 the rest, 1 head side, 2 backbone. A scale of 1
    # leaves its kind in the rest, so the groups (and a saved optimiser state) are those of a run without it.
    kind: dict[int, int] = {}
    if backbone_lr_scale != 1.0:
        kind.update((id(p), 2) for p in backbone_parameters(model))
    if head_lr_scale != 1.0:
        kind.update(dict.fromkeys(_head_side_params(model), 1))
    scales = {0: 1.0, 1: head_lr_scale, 2: backbone_lr_scale}
    buckets: dict[tuple[bool, int], list[nn.Parameter]] = {}
    for pname, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((_no_decay(pname, p), kind.get(id(p), 0)), []).append(p)
    groups = [
        {"params": buckets[key], "weight_decay": 0.0 if key[0] else weight_decay, "lr_scale": scales[key[1]]}
        for key in sorted(buckets, key=lambda k: (k[1], k[0]))
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The backbone's parameters, less the embedding layer's: what ``--freeze-backbone`` freezes and
    ``backbone_lr_scale`` scales (the neck and the head are trained as new layers). Empty for a model
    without a ``backbone`` attribute."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return []
    head_side = _head_side_params(model)
    return [p for p in backbone.parameters() if id(p) not in head_side]


def _head_side_params(model: nn.Module) -> set[int]:
    """Ids of the head's parameters and of the embedding layer's, when the model says which it is."""
    ids = set()
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        ids |= {id(p) for p in head.parameters()}
    get_layer = getattr(model, "embedding_layer", None)
    layer = get_layer() if callable(get_layer) else None
    if isinstance(layer, nn.Module):
        ids |= {id(p) for p in layer.parameters()}
    return ids


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
    """Set the learning rate of every parameter group: ``lr`` times the group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def warmup_value(start: float, target: float, fraction: float, step: int, total_steps: int) -> float:
    """A head attribute's value at ``step``: linear from ``start`` to ``target`` over ``fraction`` of the run.

    Like :func:`lr_factor`, a pure function of the global step, so resuming needs no state.
    """
    span = fraction * total_steps
    progress = 1.0 if span <= 0 else min(1.0, step / span)
    return start + (target - start) * progress
