"""The run configuration and result of :mod:`headreg.engine.train`."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import InvalidValueError
from ._optim import DEFAULT_LR, OPTIMIZERS, SCHEDULES

__all__ = ["TrainConfig", "TrainResult"]


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored as ``run.json`` in the run directory.

    Attributes:
        model: backbone name (timm, ``torchvision/<name>``, ``lenetpp``, ``lenetpp_bn``).
        head: registered head name.
        dataset: a name :func:`headreg.data.create_dataset` reads (``mnist``, ``fake``, ``imagefolder:PATH``...).
        embedding_dim: embedding width ``D``; None keeps the backbone's.
        num_classes: classes of the head; None takes the training set's.
        neck: projection to ``embedding_dim`` (``linear_bn``, ``linear``, ``none``); None lets
            :func:`headreg.create_model` choose (``linear_bn`` for timm/torchvision backbones given an
            ``embedding_dim``, none for LeNet++, whose last layer is the embedding).
        model_options: backbone keyword arguments (``widths``, ``in_chans``, ``drop_rate``...).
        head_options: head keyword arguments (``scale``, ``margin``...).
        epochs: passes over the (limited) training set.
        batch_size: global batch size (split over the ranks under torchrun).
        lr: base learning rate; None gives 0.1 for SGD, 1e-3 for AdamW.
        weight_decay: weight decay on weight matrices and kernels.
        optimizer: ``sgd`` (momentum) or ``adamw``.
        momentum: SGD momentum.
        schedule: ``cosine``, ``step`` (×0.1 at 50% and 75%) or ``constant``, per step.
        warmup_epochs: linear warm-up length, in epochs (fractions allowed).
        head_lr_scale: learning-rate multiplier for the head's parameters and the layer that outputs
            the embedding (the neck's linear layer, or LeNet++'s embedding layer).
        head_warmup: head attributes ramped linearly from a start value to their configured value
            over a fraction of the run, ``{name: [start, fraction]}`` (e.g. ``{"scale": [1, 0.7],
            "margin": [0, 0.5]}``); a head lists what it allows in ``warmup_attributes``.
        amp: mixed precision; None means on for CUDA (bf16 where supported, else fp16 with loss scaling).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        seed: seed of the initialisation, the shuffling, the ``limit`` subset and the augmentation.
        limit: train on a seeded random subset of this many samples.
        test_limit: evaluate on a seeded random subset of this many test samples.
        augment: random translation (and flips where label-preserving) while training.
        input_size: the model's input side in pixels, overriding the backbone's (or a retrieval benchmark's 224).
        data_dir: dataset root (else ``HEADREG_DATA_DIR``).
        eval_metrics: metric families of the final evaluation (see ``headreg eval --metrics``); empty skips it.
        eval_limit: compute those metrics on a seeded random subset of this many test embeddings
            (retrieval and clustering cost grows with N²; the test accuracy always uses all of them).
        shard_head: split the head's classes over the ranks (Partial FC; docs/scale.md); the head must be
            ``shardable``.
        sample_rate: with ``shard_head``, the fraction of each rank's classes scored per step, in ``(0, 1]``.
        pretrained_file: a backbone state dict to start from (insightface's ``backbone.pth``; see
            :func:`headreg.create_model`). Not written to ``run.json``: a file read back never names a
            file to open, and a resumed run takes its weights from its own state.
        pretrained: start from the backbone's pretrained weights (timm's or torchvision's), read from the local
            cache only: training never downloads (a cache miss is an error saying how to fill it). A resumed
            run takes its weights from its own state and does not read them again.
        freeze_backbone: train only the neck and the head for this many first epochs: the backbone (less the
            embedding layer) gets no gradient and keeps its batch-norm statistics (``engine/_finetune.py``).
        backbone_lr_scale: learning-rate multiplier of the backbone's parameters (less the embedding layer).
        clip_grad_norm: clip the total gradient 2-norm of each step to this value (after unscaling under
            float16); None does not clip.
        accumulate: micro-batches of ``batch_size`` per optimiser step; the step sees the gradient of the
            ``accumulate × batch_size`` batch (exactly, for a backbone without batch statistics).
        max_bad_steps: a step whose loss or gradient is non-finite is skipped and counted; this many skipped
            in a row stop the run, the last resumable state kept (``engine/_guard.py``). 0 turns the guard off.
        val: validation sets evaluated during training by ``headreg eval``'s code path (``lfw.bin``,
            ``mnist@test``, ``DATASET@QUERY/GALLERY``...; see :mod:`headreg.engine._valspec`).
        val_every: how often: ``N`` (or ``Nepochs``) epochs, or ``Nsteps`` optimiser steps; the last step
            is always validated.
        keep_best: ``[SET/]METRIC`` whose best value keeps the model in ``best/``.
        early_stop: end the run after this many validations without a better ``keep_best`` value.
        tensorboard: also write TensorBoard event files to ``tensorboard/`` (the ``tensorboard`` extra).
    """

    model: str
    head: str
    dataset: str
    embedding_dim: int | None = None
    num_classes: int | None = None
    neck: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    head_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    head_lr_scale: float = 1.0
    head_warmup: dict[str, list[float]] = field(default_factory=dict)
    amp: bool | None = None
    device: str = "auto"
    seed: int = 0
    limit: int | None = None
    test_limit: int | None = None
    augment: bool = True
    input_size: int | None = None
    data_dir: str | None = None
    eval_metrics: tuple[str, ...] = ("retrieval", "clustering")
    eval_limit: int | None = None
    shard_head: bool = False
    sample_rate: float = 1.0
    pretrained_file: str | None = None
    pretrained: bool = False
    freeze_backbone: int = 0
    backbone_lr_scale: float = 1.0
    clip_grad_norm: float | None = None
    accumulate: int = 1
    max_bad_steps: int = 10
    # validation during training (headreg.engine._validate) and TensorBoard (headreg.engine._tensorboard)
    val: tuple[str, ...] = ()
    val_every: str = "1"
    keep_best: str | None = None
    early_stop: int | None = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("limit", "test_limit", "eval_limit", "embedding_dim", "num_classes", "input_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise InvalidValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_epochs < 0:
            raise InvalidValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        # The optimiser's own ranges, checked here so that a bad value is refused before any data is read,
        # by its option's name, instead of torch's "Invalid momentum value" from inside the set-up.
        _check_range("momentum", self.momentum, low=0.0, high=1.0)
        _check_range("weight_decay", self.weight_decay, low=0.0)
        if self.lr is not None:
            _check_range("lr", self.lr, low=0.0)
        _check_range("sample_rate", self.sample_rate, low=0.0, high=1.0, low_open=True)
        if self.sample_rate != 1.0 and not self.shard_head:
            raise InvalidValueError(
                f"sample_rate={self.sample_rate!r} samples a sharded head's classes; add shard_head"
            )
        if not (isinstance(self.head_lr_scale, (int, float)) and 0 < self.head_lr_scale < float("inf")):
            raise InvalidValueError(f"head_lr_scale must be a finite number > 0, got {self.head_lr_scale!r}")
        self.head_lr_scale = float(self.head_lr_scale)
        self._check_stability()
        self.head_warmup = {str(k): _warmup_entry(k, v) for k, v in dict(self.head_warmup or {}).items()}
        self.eval_metrics = tuple(self.eval_metrics)
        self.model_options = dict(self.model_options or {})
        self.head_options = dict(self.head_options or {})
        self._check_validation()

    def _check_validation(self) -> None:
        from ._valspec import canonical_every, parse_protocols, parse_val, split_best

        self.val = parse_val(self.val)
        self.val_every = canonical_every(self.val_every)
        if self.keep_best is not None:
            split_best(self.keep_best, [p.key for p in parse_protocols(self.val)])
        if self.early_stop is not None:
            if isinstance(self.early_stop, bool) or not isinstance(self.early_stop, int) or self.early_stop < 1:
                raise InvalidValueError(f"early_stop must be a positive number of validations, got {self.early_stop!r}")
            if self.keep_best is None:
                raise InvalidValueError("--early-stop watches the --keep-best metric: give --keep-best METRIC too")
        if not self.val and self.val_every != "1":
            raise InvalidValueError(f"--val-every {self.val_every} needs --val (the sets to validate on)")
        self.tensorboard = bool(self.tensorboard)

    def _check_stability(self) -> None:
        """The fine-tuning and step-guard fields (``pretrained`` ... ``max_bad_steps``)."""
        for name, low in (("freeze_backbone", 0), ("accumulate", 1), ("max_bad_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InvalidValueError(f"{name} must be an integer >= {low}, got {v!r}")
        _check_range("backbone_lr_scale", self.backbone_lr_scale, low=0.0, low_open=True)
        self.backbone_lr_scale = float(self.backbone_lr_scale)
        if self.clip_grad_norm is not None:
            _check_range("clip_grad_norm", self.clip_grad_norm, low=0.0, low_open=True)
        if self.accumulate > 1 and self.sample_rate < 1.0:
            raise InvalidValueError(
                f"accumulate={self.accumulate} with sample_rate={self.sample_rate:g}: each micro-batch keeps other "
                "classes, and a step updates only the rows kept by one forward pass; use sample_rate=1 or a "
                "larger per-process batch (docs/scale.md)"
            )
        if not isinstance(self.pretrained, bool):
            raise InvalidValueError(f"pretrained must be true or false, got {self.pretrained!r}")
        if self.pretrained and self.pretrained_file is not None:
            raise InvalidValueError(
                "give pretrained or pretrained_file, not both: they both load the backbone's weights"
            )

    @property
    def base_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_metrics"] = list(self.eval_metrics)
        d["val"] = list(self.val)
        del d["pretrained_file"]  # see the attribute: never recorded
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)} - {"pretrained_file"}  # never read from a file (see the attribute)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidValueError(f"run config has unknown keys {unknown}; written by a newer headreg?")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise InvalidValueError(f"run config lacks the required keys {missing}; it cannot rebuild the run")
        return cls(**d)


def _check_range(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """``value`` must be a finite real number (not a bool) in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (low_open and value == low):
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise InvalidValueError(f"{name} must be a finite number {bounds}, got {value!r}")


def _warmup_entry(name: str, value: Any) -> list[float]:
    try:
        start, fraction = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"head_warmup[{name!r}] must be [start, fraction], got {value!r}") from None
    if not 0 < fraction <= 1:
        raise InvalidValueError(f"head_warmup[{name!r}]: the fraction of the run must be in (0, 1], got {fraction!r}")
    return [start, fraction]


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; files are written by rank 0 only).

    Attributes:
        run_dir: the run directory.
        status: ``completed`` or ``stopped`` (Ctrl-C or a step budget; resumable).
        epochs_done: epochs finished.
        global_step: optimiser steps taken.
        history: the ``metrics.jsonl`` records of the epochs run so far.
        eval: the final evaluation (``eval.json``), empty when stopped.
        train_seconds: training time (steps only) summed over epochs.
        model: the trained (unwrapped) model.
        embeddings: ``(N, D)`` test embeddings of the final model (rank 0), or None when stopped.
        labels: ``(N,)`` their labels.
        validations: the ``metrics.jsonl`` records of the validations (``--val``).
        early_stop: why the run ended early (``--early-stop``), else None.
    """

    run_dir: Path
    status: str
    epochs_done: int
    global_step: int
    history: list[dict[str, Any]]
    eval: dict[str, Any]
    train_seconds: float
    model: Any = None
    embeddings: Tensor | None = None
    labels: Tensor | None = None
    validations: list[dict[str, Any]] = field(default_factory=list)
    early_stop: str | None = None

    @property
    def test_accuracy(self) -> float | None:
        if self.eval:
            return self.eval.get("test_accuracy")
        return self.history[-1].get("test_accuracy") if self.history else None  # None: unseen test classes
