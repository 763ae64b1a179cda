"""What every head shares: the output type, input checks and the float32 region.

A head is any ``nn.Module`` built as ``Head(in_features, num_classes, **options)``
whose ``forward(embeddings, labels=None)`` returns a :class:`HeadOutput` when labels
are given and the margin-free logits tensor when they are not. Plugin heads need not
subclass anything here; the helpers are public so that they can reuse them.

A head describes itself to the rest of headreg through optional class attributes, read
with the ``head_*`` functions below so that a plain ``nn.Module`` without them gets the
defaults :class:`Head` declares: ``angular``, ``settings_2d``, ``margin_feasibility``,
``warmup_attributes`` and ``shardable`` (with ``shard_refusal``). Nothing outside
``headreg.heads`` keeps lists of head names.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, InvalidValueError
from ._fused import FusedTerms

__all__ = [
    "HeadOutput",
    "kept_logits",
    "Head",
    "check_embeddings",
    "check_labels",
    "check_positive",
    "check_non_negative",
    "check_angle",
    "check_number",
    "check_bool",
    "check_scale",
    "check_cosine_margin",
    "HeadOptionWarning",
    "float32_region",
    "head_is_angular",
    "head_fused_terms",
    "head_settings_2d",
    "head_margin_feasibility",
]


@dataclass
class HeadOutput:
    """What a head returns in training.

    Attributes:
        loss: Scalar loss, averaged over the batch.
        logits: ``(B, C)`` logits as fed to the loss, margin applied to the target column. A head on the
            fused path (``fused_terms``) does not keep them: they are rebuilt on first access by
            ``logits_fn`` (with autograd, as before), and reading them after the weights changed
            (``optimizer.step()``) is an error.
        embeddings: ``(B, D)`` embeddings the head was given; the model fills this in.
        top1: ``(B,)`` bool, the label ranks first under the margin-free logits of this forward pass (no
            logit strictly above it, ties counting as hits), when the head finds it on the way; else None.
        logits_fn: builds ``logits`` when they were not kept.
    """

    loss: Tensor
    logits: Tensor | None = field(default=None, repr=False, compare=False)
    embeddings: Tensor | None = None
    top1: Tensor | None = None
    logits_fn: Callable[[], Tensor] | None = field(default=None, repr=False, compare=False)


def _get_logits(self: HeadOutput) -> Tensor | None:
    value = self.__dict__.get("_logits")
    if value is None and self.logits_fn is not None:
        value = self.__dict__["_logits"] = self.logits_fn()
    return value


def _set_logits(self: HeadOutput, value: Tensor | None) -> None:
    self.__dict__["_logits"] = value


# A property over the dataclass field: HeadOutput(loss, logits) still works, and unkept logits are built on demand.
HeadOutput.logits = property(_get_logits, _set_logits, doc="The margin logits, kept or rebuilt on demand.")  # type: ignore[assignment,method-assign]


def kept_logits(out: Any) -> Tensor | None:
    """The logits ``out`` holds, without rebuilding a fused head's unkept ones (None then): for per-step checks."""
    if isinstance(out, HeadOutput):
        return out.__dict__.get("_logits")
    return getattr(out, "logits", None)


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


class HeadOptionWarning(UserWarning):
    """A head option inside its range but beyond what the papers use (e.g. ``scale`` > 1024): allowed on purpose."""


#: ``s`` above this is an error: a float32 logit ``s · cos θ`` then resolves cosines no finer than
#: ``s · 2⁻²⁴ ≥ 0.06`` and the softmax is a hard argmax; ``s`` near 1e38 overflows to inf and the loss to NaN.
MAX_SCALE = 1e6
#: ``s`` above this warns (:class:`HeadOptionWarning`): the papers use 16 to 64, and the softmax saturates
#: well before; a study of saturation may still want it.
WARN_SCALE = 1024.0


def _as_real(name: str, value: Any, expected: str) -> float:
    """``float(value)`` for a real number; bools, strings and other types are refused, not converted."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a bool" if isinstance(value, bool) else type(value).__name__
        raise InvalidValueError(f"{name} must be {expected}, got {value!r} ({kind})")
    return float(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` or raise `InvalidValueError` unless it is a finite real number in the range.

    A bool is not a number here (``scale=True`` is refused, not read as 1.0), nor is a string.

    Args:
        name: the option, for the message.
        value: what was given.
        low, high: the bounds (infinite: unbounded on that side; the value must be finite anyway).
        low_open, high_open: the bound itself is excluded.
    """
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    expected = f"a finite number in {lo}{low:g}, {high:g}{hi}"
    v = _as_real(name, value, expected)
    outside = v < low or v > high or (low_open and v == low) or (high_open and v == high)
    if not math.isfinite(v) or outside:
        raise InvalidValueError(f"{name} must be {expected}, got {value!r}")
    return v


def check_positive(name: str, value: float) -> float:
    """Return ``float(value)`` or raise `InvalidValueError` unless it is a finite number > 0."""
    v = _as_real(name, value, "a number > 0")
    if not (v > 0 and v != float("inf")):
        raise InvalidValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_non_negative(name: str, value: float) -> float:
    """Return ``float(value)`` or raise `InvalidValueError` unless it is a finite number >= 0."""
    v = _as_real(name, value, "a number >= 0")
    if not (v >= 0 and v != float("inf")):
        raise InvalidValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_angle(name: str, value: float) -> float:
    """Return ``float(value)`` or raise `InvalidValueError` unless it is an angle in ``[0, π)`` radians."""
    v = check_non_negative(name, value)
    if v >= math.pi:
        raise InvalidValueError(f"{name} must be in [0, π) radians, got {value!r}")
    return v


def check_cosine_margin(name: str, value: float) -> float:
    """An additive cosine margin ``m`` in ``[0, 2)``: with ``m ≥ 2`` the target ``cos θ − m ≤ −1`` can never win."""
    return check_number(name, value, low=0.0, high=2.0, high_open=True)


def check_scale(name: str, value: float) -> float:
    """A logit scale ``s`` in ``(0, MAX_SCALE]``; above :data:`WARN_SCALE` it warns (:class:`HeadOptionWarning`)."""
    v = check_number(name, value, low=0.0, high=MAX_SCALE, low_open=True)
    if v > WARN_SCALE:
        warnings.warn(
            f"{name}={v:g} is far above the 16-64 the papers use: the softmax saturates and float32 logits "
            "lose the cosine's resolution",
            HeadOptionWarning,
            stacklevel=3,
        )
    return v


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (NumPy's too); a string such as ``"false"`` or a number is refused."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


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
    #: The classes may be split into contiguous row blocks over the ranks (Partial FC; docs/scale.md): the loss
    #: is the cross-entropy whose column ``c`` needs class ``c``'s own rows only (weight, bias, centre), margin on
    #: the target column, given by :meth:`shard_terms`; every parameter and buffer is per class (first dimension
    #: a multiple of ``num_classes``) or a 0-d buffer every rank advances alike. A shardable head whose options
    #: break this defines ``shard_refusal(self) -> str``, the reason (``""`` when they do not).
    shardable: ClassVar[bool] = False

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

    def fused_terms(self, x: Tensor) -> FusedTerms | None:
        """The terms of the fused margin cross-entropy for these ``(B, D)`` embeddings, or None (the default).

        A head whose training loss is "cosine (or linear) matrix → per-target transform → scale →
        cross-entropy" returns :class:`~headreg.heads.functional.FusedTerms`, so that whoever holds the
        class weights (the head, or a class-sharded wrapper) computes the loss with
        :func:`~headreg.heads.functional.fused_margin_cross_entropy` in one ``(B, C)`` buffer. Called once
        per training step with labels (a head may advance a schedule here, as SphereFace's λ).
        """
        return None

    def inference_logits(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def shard_terms(self, x: Tensor) -> FusedTerms | None:
        """The cross-entropy part of the loss for the class-sharded wrapper: :meth:`fused_terms` unless the loss is
        more (center loss: its softmax part; ``partial_penalty(x, labels, sharded=)`` gives the rest, a sum over
        the rows whose class ``labels[b] >= 0`` is the block's, which the wrapper sums over the ranks)."""
        return self.fused_terms(x)

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


def head_is_angular(cls: type) -> bool:
    """Whether a head class declares itself angular (``angular``; :class:`Head`'s default when it does not)."""
    return bool(getattr(cls, "angular", Head.angular))


def head_fused_terms(head: nn.Module, x: Tensor) -> FusedTerms | None:
    """A head's :meth:`Head.fused_terms` for ``x`` (None when it has no such method: not on the margin path)."""
    hook = getattr(head, "fused_terms", None)
    return None if hook is None else hook(x)


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
