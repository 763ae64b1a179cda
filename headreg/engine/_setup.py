"""Set-up of a training run: data, model, transforms, optimiser and the step context, from a config.

Everything here is decided from the config and the ranks alone, so a fresh run and a resumed one build the
same objects; :meth:`headreg.engine._runner.Run.restore` then loads a resumed run's state into them.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidValueError
from ._config import TrainConfig
from ._distributed import Ranks
from ._feasibility import MarginFeasibilityWarning, TrainingWarning, margin_feasibility
from ._finetune import BackboneFreeze
from ._guard import StepGuard
from ._loop import StepContext
from ._optim import build_optimizer
from ._shard_head import wrap_for_training

__all__ = ["Session", "build_session"]


@dataclass
class Session:
    """What set-up built for one run.

    Attributes:
        model: the (unwrapped) :class:`~headreg.HeadModel`, on the run's device, in training mode.
        num_classes: classes of the head.
        train_loader: this rank's shuffled, sharded training batches.
        test_loader: this rank's shard of the test split, in order.
        train_transform: uint8 batch → model input, with augmentation (its generator is resumable state).
        test_transform: uint8 batch → model input, for evaluation.
        optimizer: the optimiser over every trainable parameter.
        autocast_dtype: the training's autocast dtype, None for float32.
        ctx: what a step needs (the model DDP-wrapped under several ranks).
        freeze: the backbone's frozen phase (``freeze_backbone``), set by the runner at each epoch.
    """

    model: nn.Module
    num_classes: int
    train_loader: Any
    test_loader: Any
    train_transform: nn.Module
    test_transform: nn.Module
    optimizer: torch.optim.Optimizer
    autocast_dtype: torch.dtype | None
    ctx: StepContext
    freeze: BackboneFreeze


def build_session(cfg: TrainConfig, ranks: Ranks) -> Session:
    """Seed, read the data, build the model, the loaders, the transforms, the optimiser and the step context.

    Raises:
        InvalidValueError: labels outside the head's classes, a batch larger than the training set, a head
            attribute the head cannot warm up.
    """
    from ..data import create_dataset, create_loader, is_pairs_dataset, resolve_transform
    from ..data.loader import default_workers
    from ..models import create_model

    if is_pairs_dataset(cfg.dataset):
        raise InvalidValueError(
            f"dataset {cfg.dataset!r} holds verification pairs, not labelled classes, so it cannot train a head; "
            "train on a classification dataset and evaluate with `headreg eval --dataset bin:PATH`"
        )
    dev = ranks.device
    _seed_everything(cfg.seed)
    train_ds = create_dataset(cfg.dataset, "train", data_dir=cfg.data_dir)
    test_ds = create_dataset(cfg.dataset, "test", data_dir=cfg.data_dir)
    num_classes = _check_classes(cfg, train_ds, test_ds)
    for msg in margin_feasibility(cfg.head, cfg.head_options, cfg.embedding_dim, num_classes):
        if ranks.main:
            warnings.warn(msg, MarginFeasibilityWarning, stacklevel=4)  # the caller of train()
    model = create_model(
        cfg.model,
        cfg.head,
        num_classes=num_classes,
        embedding_dim=cfg.embedding_dim,
        head_options=cfg.head_options,
        neck=cfg.neck,
        pretrained=cfg.pretrained,
        download=False,
        pretrained_file=cfg.pretrained_file,
        shard_head=cfg.shard_head,
        sample_rate=cfg.sample_rate,
        **cfg.model_options,
    )
    model = model.to(dev).train()
    per_rank_batch = cfg.batch_size // ranks.info.world_size
    on_device = dev if dev.type != "cpu" else None
    # File-backed datasets (image folders, the retrieval benchmarks, rec:) decode in workers; in-memory ones ignore it.
    workers = default_workers()
    train_loader = create_loader(
        train_ds, batch_size=per_rank_batch, shuffle=True, seed=cfg.seed, drop_last=True, limit=cfg.limit,
        device=on_device, num_workers=workers,
    )  # fmt: skip
    if len(train_loader) == 0:
        n = len(train_ds) if cfg.limit is None else min(cfg.limit, len(train_ds))
        raise InvalidValueError(
            f"batch_size={cfg.batch_size} is larger than the {n} training samples"
            f"{f' (limit={cfg.limit})' if cfg.limit else ''}; lower --batch-size or raise --limit"
        )
    test_loader = create_loader(
        test_ds, batch_size=max(256, per_rank_batch), shuffle=False, seed=cfg.seed, limit=cfg.test_limit,
        device=on_device, num_workers=workers,
    )  # fmt: skip
    data_cfg = dict(model.pretrained_cfg)
    rank = ranks.info.rank
    size = cfg.input_size
    train_tf = resolve_transform(
        data_cfg, train_ds, train=True, input_size=size, augment=cfg.augment, seed=cfg.seed + rank
    )
    test_tf = resolve_transform(data_cfg, test_ds, train=False, input_size=size)
    optimizer = build_optimizer(
        model, cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.momentum, head_lr_scale=cfg.head_lr_scale,
        backbone_lr_scale=cfg.backbone_lr_scale,
    )  # fmt: skip
    head_targets = _check_head_warmup(model.head, cfg.head, cfg.head_warmup)
    autocast_dtype = _amp_dtype(cfg.amp, dev)
    scaler = torch.amp.GradScaler(dev.type) if autocast_dtype == torch.float16 else None
    steps_per_epoch = len(train_loader) // cfg.accumulate
    if steps_per_epoch == 0:
        raise InvalidValueError(
            f"accumulate={cfg.accumulate} needs that many batches per step, but an epoch has {len(train_loader)} "
            f"batches of {cfg.batch_size}; lower --accumulate or --batch-size, or raise --limit"
        )
    step_model = wrap_for_training(model, ranks.wrap, optimizer)  # DDP; a sharded head stays out of it
    guard = StepGuard(
        model, max_bad_steps=cfg.max_bad_steps, clip_grad_norm=cfg.clip_grad_norm, distributed=ranks.distributed,
        amp_dtype=autocast_dtype,
    )  # fmt: skip
    ctx = StepContext(
        model=step_model, optimizer=optimizer, transform=train_tf, device=dev, base_lr=cfg.base_lr,
        schedule=cfg.schedule, total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), autocast_dtype=autocast_dtype, scaler=scaler,
        distributed=ranks.distributed, head=model.head, head_warmup=cfg.head_warmup, head_targets=head_targets,
        accumulate=cfg.accumulate, guard=guard if guard.enabled or guard.clip is not None else None,
    )  # fmt: skip
    return Session(
        model=model, num_classes=num_classes, train_loader=train_loader, test_loader=test_loader,
        train_transform=train_tf, test_transform=test_tf, optimizer=optimizer, autocast_dtype=autocast_dtype, ctx=ctx,
        freeze=BackboneFreeze(model, cfg.freeze_backbone),
    )  # fmt: skip


def _check_classes(cfg: TrainConfig, train_ds: Any, test_ds: Any) -> int:
    """The head's class count: the config's, else the training set's; labels beyond it are an error."""
    have = int(train_ds.num_classes)
    n = cfg.num_classes if cfg.num_classes is not None else have
    top_train = int(train_ds.targets.max())
    # Unseen test classes (the retrieval benchmarks) are numbered on their own: never the head's classes.
    top_test = -1 if getattr(test_ds, "unseen_classes", False) else int(test_ds.targets.max())
    if top_train >= n or top_test >= n:
        split, top = ("train", top_train) if top_train >= n else ("test", top_test)
        raise InvalidValueError(
            f"num_classes={n} but the {split} split of dataset '{cfg.dataset}' has labels up to {top}; "
            f"labels must lie in [0, num_classes), so use num_classes >= {max(top_train, top_test) + 1}"
        )
    if n > have:
        warnings.warn(
            f"num_classes={n} but dataset '{cfg.dataset}' has only {have} classes: "
            f"{n - have} head classes will never see a sample",
            TrainingWarning,
            stacklevel=5,  # the caller of train()
        )
    return n


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _check_head_warmup(head: Any, head_name: str, warmup: dict[str, list[float]]) -> dict[str, float]:
    """The configured value of each attribute in ``warmup``; checks the head allows it and the start is valid."""
    allowed = tuple(getattr(head, "warmup_attributes", ()))
    targets: dict[str, float] = {}
    for name, (start, _) in warmup.items():
        if name not in allowed:
            raise InvalidValueError(
                f"head {head_name!r} cannot warm up {name!r}; it allows "
                + (", ".join(repr(a) for a in allowed) if allowed else "no warm-up")
            )
        targets[name] = float(getattr(head, name))
        setattr(head, name, start)  # the head's setter validates the start value
        setattr(head, name, targets[name])
    return targets


def _amp_dtype(amp: bool | None, device: torch.device) -> torch.dtype | None:
    """The training's autocast dtype: bf16 where the device has it, float16 (with loss scaling) elsewhere."""
    use = amp if amp is not None else device.type == "cuda"
    if not use:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float16
