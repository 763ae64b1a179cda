"""What every head shares: the output type, input checks and the float32 region.

A head is any ``nn.Module`` built as ``Head(in_features, num_classes, **options)``
whose ``forward(embeddings, labels=None)`` returns a :class:`HeadOutput` when labels
are given and the margin-free logits tensor when they are not. Plugin heads need not
subclass anything here; the helpers are public so that they can reuse them.

A head describes itself to the rest of headreg through optional class attributes, read
with the ``head_*`` functions below so that a plain ``nn.Module`` without them gets the
defaults :class:`Head` declares: ``angular``, ``settings_2d``, ``margin_feasibility`` and
``warmup_attributes``. Nothing outside ``headreg.heads`` keeps lists of head names.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, InvalidValueError

__all__ = [
    "HeadOutput",
    "Head",
    "check_embeddings",
    "check_labels",
    "check_positive",
    "check_non_negative",
    "check_angle",
    "float32_region",
    "head_is_angular",
    "head_settings_2d",
    "head_margin_feasibility",
]


@dataclass
class HeadOutput:
    """What a head returns in training.

    Attributes:
        loss: Scalar loss, averaged over the batch.
        logits: ``(B, C)`` logits as fed to the loss, margin applied to the target column.
        embeddings: ``(B, D)`` embeddings the head was given; the model fills this in.
    """

    loss: Tensor
    logits: Tensor
    embeddings: Tensor | None = None


def check_embeddings(embeddings: Tensor, in_features: int) -> None:
    """Raise `InvalidInputError` unless ``embeddings`` is a floating ``(B, in_features)`` tensor."""
    if not isinstance(embeddings, Tensor):
        raise InvalidInputError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2 or embeddings.shape[1] != in_features:
        raise InvalidInputError(f"embeddings must have shape (batch, {in_features}), got {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise InvalidInputError(f"embeddings must be a floating-point tensor, got {embeddings.dtype}")
    if embeddings.shape[0] == 0:
        raise InvalidInputError("embeddings must hold at least one row, got an empty batch")


def check_labels(labels: Tensor, batch_size: int, num_classes: int) -> None:
    """Raise `InvalidInputError` unless ``labels`` is an integer ``(B,)`` tensor in ``[0, num_classes)``.

    The range is checked on the host before any indexing: on CUDA an out-of-range
    index is a device-side assert that kills the process, not an exception.
    """
    if not isinstance(labels, Tensor):
        raise InvalidInputError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != (batch_size,):
        raise InvalidInputError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidInputError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
    lo, hi = torch.aminmax(labels)
    lo, hi = torch.stack([lo, hi]).tolist()  # one device sync for both bounds
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise InvalidInputError(f"labels must lie in [0, {num_classes}), got a label {bad}")


def check_positive(name: str, value: float) -> float:
    """Return ``float(value)`` or raise `InvalidValueError` unless it is a finite number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not (v > 0 and v != float("inf")):
        raise InvalidValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_non_negative(name: str, value: float) -> float:
    """Return ``float(value)`` or raise `InvalidValueError` unless it is a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise InvalidValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_angle(name: str, value: float) -> float:
    """Return ``float(value)`` or raise `InvalidValueError` unless it is an angle in ``[0, π)`` radians."""
    v = check_non_negative(name, value)
    if v >= math.pi:
        raise InvalidValueError(f"{name} must be in [0, π) radians, got {value!r}")
    return v


def checked_property(name: str, check: Callable[[str, Any], float], doc: str) -> property:
    """A float attribute stored as ``_<name>`` whose setter validates with ``check(name, value)``.

    For head settings a trainer may change after construction (``warmup_attributes``):
    ``margin = checked_property("margin", check_non_negative, "The margin m.")``.
    """
    private = f"_{name}"

    def fget(self: Any) -> float:
        return getattr(self, private)

    def fset(self: Any, value: Any) -> None:
        setattr(self, private, check(name, value))

    return property(fget, fset, doc=doc)


@contextlib.contextmanager
def float32_region(x: Tensor) -> Iterator[torch.dtype]:
    """Run the enclosed head arithmetic with autocast off, in float32 or wider.

    Margins such as ``cos(θ + m)`` and a softmax over ``s · cos θ`` with ``s = 64`` lose
    their meaning in bf16 (8 bits of mantissa). Yields the dtype to compute in:
    float64 stays float64 (for gradcheck), anything narrower becomes float32.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield dtype
    else:
        yield dtype


class Head(nn.Module):
    """Base class of the built-in heads: stores the sizes and validates inputs.

    Subclasses implement :meth:`inference_logits` and :meth:`training_output`.
    ``forward`` checks the inputs, enters the float32 region and dispatches.

    Args:
        in_features: Width ``D`` of the embeddings.
        num_classes: Number of classes ``C``.
    """

    #: A link to the paper the head implements; shown by ``headreg list``.
    paper: str = ""
    #: Float attributes a trainer may ramp from a start value to their configured value
    #: (``headreg train --head-warmup NAME=START:FRACTION``); each must have a validating setter.
    warmup_attributes: tuple[str, ...] = ()
    #: The class decision depends on the feature's direction only, not its norm (the logits are
    #: ``‖x‖ cos θ`` or ``s cos θ``): ``headreg compare`` also draws the features on the unit
    #: circle, and the margin check notes that 1-D features separate at most two classes by angle.
    angular: ClassVar[bool] = False
    #: Constructor options suggested for 2-D features (``headreg compare --embedding-dim 2``), where
    #: face-recognition defaults such as ``s = 64`` saturate the softmax or a margin cannot be met.
    #: Any option not listed keeps its default; ``{}``: the defaults suit 2-D features.
    settings_2d: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    @classmethod
    def margin_feasibility(cls, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
        """Why this head's margin cannot be met by ``embedding_dim``-D features of ``num_classes`` classes.

        ``headreg train`` and ``headreg compare`` warn with these lines before training. Margin heads
        override it, mostly with a function of :mod:`headreg.heads._geometry`
        (``arcface_margin_feasibility(options["margin"], embedding_dim, num_classes)``).

        Args:
            options: the constructor options the head is built with, its defaults filled in.
            embedding_dim: feature width ``D ≥ 1``.
            num_classes: number of classes ``C ≥ 2``.

        Returns:
            Warning sentences with the head's name left out (``"margin=0.35 cannot be met with ..."``);
            headreg puts the registry name in front. Empty (the default): feasible, or no margin.
        """
        return []

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_features = in_features
        self.num_classes = num_classes

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> HeadOutput | Tensor:
        """Logits without margin (no labels), or loss and margin logits (with labels).

        Args:
            embeddings: ``(B, D)`` floating tensor.
            labels: optional ``(B,)`` integer class indices in ``[0, C)``.

        Returns:
            ``(B, C)`` float32 logits when ``labels`` is None, else a :class:`HeadOutput`.
        """
        check_embeddings(embeddings, self.in_features)
        if labels is not None:
            check_labels(labels, embeddings.shape[0], self.num_classes)
        with float32_region(embeddings) as dtype:
            x = embeddings.to(dtype)
            if labels is None:
                return self.inference_logits(x)
            return self.training_output(x, labels)

    def inference_logits(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


def head_is_angular(cls: type) -> bool:
    """Whether a head class declares itself angular (``angular``; :class:`Head`'s default when it does not)."""
    return bool(getattr(cls, "angular", Head.angular))


def head_settings_2d(cls: type) -> dict[str, Any]:
    """A head class's suggested options for 2-D features (``settings_2d``), as a new dict."""
    return dict(getattr(cls, "settings_2d", Head.settings_2d))


def head_margin_feasibility(cls: type, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
    """A head class's ``margin_feasibility`` lines (none when it has no such classmethod).

    Args:
        cls: the head class.
        options: its constructor options, defaults filled in.
        embedding_dim: feature width ``D``.
        num_classes: number of classes ``C``.
    """
    hook = getattr(cls, "margin_feasibility", None)
    return [] if hook is None else list(hook(options, embedding_dim, num_classes))
