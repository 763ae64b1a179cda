"""The angular-margin family: NormFace, CosFace, ArcFace and insightface's combined margin.

Each is the shared pipeline of :class:`AngularMarginHead` (normalise → cosine →
margin on the target column → scale → cross-entropy) with its own target function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import InvalidValueError
from ._geometry import arcface_margin_feasibility, combined_margin_feasibility, cosface_margin_feasibility
from .base import (
    Head,
    HeadOutput,
    check_angle,
    check_bool,
    check_cosine_margin,
    check_number,
    check_scale,
    checked_property,
)
from .functional import (
    FusedTerms,
    arcface_margin,
    combined_margin,
    cosface_margin,
    cosine_linear,
    fused_output,
    normalize,
)

__all__ = ["AngularMarginHead", "NormFaceHead", "CosFaceHead", "ArcFaceHead", "CombinedMarginHead"]

#: The largest multiplicative margin ``m1``: SphereFace uses up to 4; far beyond, ``cos(m1 θ)`` oscillates
#: so fast in θ that the target logit no longer decreases with the angle.
MAX_M1 = 8.0


class AngularMarginHead(Head):
    """Shared pipeline of the normalised heads: ``logits = s · cos θ``, target ``s · ψ(cos θ_y)``.

    Subclasses override :meth:`margin_target` (identity here). Without labels the logits carry
    no margin, so they are what a classifier or a retrieval score should use.

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        scale: ``s`` in ``(0, 1e6]``, the radius of the hypersphere the logits live on (above 1024 it warns).
        learn_scale: Make ``s`` a learned parameter (kept positive through its log).
    """

    warmup_attributes: tuple[str, ...] = ("scale",)
    angular: ClassVar[bool] = True
    shardable: ClassVar[bool] = True  # column c is s·ψ(cos θ_c), from class c's weight row alone

    def __init__(self, in_features: int, num_classes: int, scale: float = 64.0, learn_scale: bool = False) -> None:
        super().__init__(in_features, num_classes)
        scale = check_scale("scale", scale)
        # N(0, 0.01) as insightface; the norm of a class weight does not enter the logits.
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).normal_(std=0.01))
        self.learn_scale = check_bool("learn_scale", learn_scale)
        # A fixed s stays a Python float: a float32 buffer would round log(s) or s itself,
        # which float64 references (and gradcheck) would see.
        self._fixed_scale = float(scale)
        if self.learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())
            self.warmup_attributes = ()  # a learned s is the optimiser's

    @property
    def scale(self) -> float:
        """The current ``s`` as a Python float."""
        return float(self.log_scale.detach().exp()) if self.learn_scale else self._fixed_scale

    @scale.setter
    def scale(self, value: float) -> None:
        if self.learn_scale:
            raise InvalidValueError("scale is learned (learn_scale=True); it cannot be set")
        self._fixed_scale = check_scale("scale", value)

    def _scale(self, dtype: torch.dtype) -> Tensor | float:
        return self.log_scale.to(dtype).exp() if self.learn_scale else self._fixed_scale

    def margin_target(self, cos_target: Tensor) -> Tensor:
        """Target cosine after the margin, from ``(B,)`` target cosines. Identity here."""
        return cos_target

    def inference_logits(self, x: Tensor) -> Tensor:
        return cosine_linear(x, self.weight.to(x.dtype)) * self._scale(x.dtype)

    def fused_terms(self, x: Tensor) -> FusedTerms:
        """``x̂``, ``s`` and :meth:`margin_target` (None when a subclass keeps the identity: no margin)."""
        psi = None if type(self).margin_target is AngularMarginHead.margin_target else self.margin_target
        return FusedTerms(normalize(x), self._scale(x.dtype), psi)

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:
        # Cosine, margin on the target column, scale and cross-entropy in one (B, C) buffer (heads/_fused.py).
        return fused_output(self.fused_terms(x), self.weight.to(x.dtype), labels)


class NormFaceHead(AngularMarginHead):
    """NormFace: features and weights normalised, ``logits = s · cos θ``, no margin.

    Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017
    (Eq. 5-6). The paper shows a fixed s must exceed a bound that grows with the number of
    classes (Prop. 2) and mostly learns s; headreg's default is a fixed ``s = 16``, set
    ``learn_scale=True`` for the learned variant.

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        scale: ``s`` in ``(0, 1e6]`` (above 1024 it warns).
        learn_scale: Learn ``s``.
    """

    paper = "https://arxiv.org/abs/1704.06369"
    # The default s = 16 already suits 2-D: the nearest of 10 classes sit at cos 36° = 0.81, so
    # logits differ by up to 0.19 s ≈ 3 (docs/compare.md, "2-D settings per head").
    settings_2d: ClassVar[Mapping[str, Any]] = {"scale": 16.0}

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0, learn_scale: bool = False) -> None:
        super().__init__(in_features, num_classes, scale=scale, learn_scale=learn_scale)


class CosFaceHead(AngularMarginHead):
    """CosFace (large margin cosine loss): target logit ``s · (cos θ_y − m)``.

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018,
    Eq. 4; defaults ``s = 64``, ``m = 0.35`` as in the paper's experiments.

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        scale: ``s`` in ``(0, 1e6]`` (above 1024 it warns).
        margin: additive cosine margin ``m`` in ``[0, 2)``.
    """

    warmup_attributes: tuple[str, ...] = ("scale", "margin")

    paper = "https://arxiv.org/abs/1801.09414"
    # The default (64, 0.35) cannot be met in 2-D (m < 0.191 for 10 classes): half that bound,
    # and an s that does not saturate a 10-class softmax.
    settings_2d: ClassVar[Mapping[str, Any]] = {"scale": 16.0, "margin": 0.1}

    @classmethod
    def margin_feasibility(cls, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
        """Warns unless ``m < 1 − cos δ`` (see :mod:`headreg.heads._geometry`)."""
        return cosface_margin_feasibility(options["margin"], embedding_dim, num_classes)

    def __init__(self, in_features: int, num_classes: int, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__(in_features, num_classes, scale=scale)
        self.margin = margin

    margin = checked_property("margin", check_cosine_margin, "The additive cosine margin ``m``, in ``[0, 2)``.")

    def margin_target(self, cos_target: Tensor) -> Tensor:
        return cosface_margin(cos_target, self.margin)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}, margin={self.margin:g}"


class ArcFaceHead(AngularMarginHead):
    """ArcFace (additive angular margin): target logit ``s · cos(θ_y + m)``.

    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019,
    Eq. 3; defaults ``s = 64``, ``m = 0.5`` rad. Where ``θ + m > π`` the target is
    ``cos θ − m sin m`` (the fallback of the reference implementations), so it keeps
    decreasing in θ. Gradients are exact, unlike insightface's in-place no-grad margin.

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        scale: ``s`` in ``(0, 1e6]`` (above 1024 it warns).
        margin: additive angular margin ``m`` in radians, ``0 ≤ m < π``.
        easy_margin: apply the margin only where ``cos θ > 0`` (no fallback needed).
    """

    warmup_attributes: tuple[str, ...] = ("scale", "margin")

    paper = "https://arxiv.org/abs/1801.07698"
    # The default m = 0.5 is feasible for 10 classes in 2-D (m < 0.628) but leaves features only
    # (0.628 − 0.5)/2 = 3.7° of room around their class direction; 0.2 leaves 12°.
    settings_2d: ClassVar[Mapping[str, Any]] = {"scale": 16.0, "margin": 0.2}

    @classmethod
    def margin_feasibility(cls, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
        """Warns unless ``m < δ`` (see :mod:`headreg.heads._geometry`)."""
        return arcface_margin_feasibility(options["margin"], embedding_dim, num_classes)

    def __init__(
        self, in_features: int, num_classes: int, scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False
    ) -> None:
        super().__init__(in_features, num_classes, scale=scale)
        self.margin = margin
        self.easy_margin = check_bool("easy_margin", easy_margin)

    margin = checked_property("margin", check_angle, "The additive angular margin ``m`` in radians.")

    def margin_target(self, cos_target: Tensor) -> Tensor:
        return arcface_margin(cos_target, self.margin, self.easy_margin)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}, margin={self.margin:g}, easy={self.easy_margin}"


class CombinedMarginHead(AngularMarginHead):
    """InsightFace's combined margin: target logit ``s · (cos(m1·θ_y + m2) − m3)``.

    From insightface's ``arcface_torch`` (``CombinedMarginLoss``); covers SphereFace-like
    (``m1``), ArcFace (``m2``) and CosFace (``m3``) margins in one formula. Defaults
    ``s = 64``, ``(m1, m2, m3) = (1.0, 0.3, 0.2)``, the combination insightface ships.

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        scale: ``s`` in ``(0, 1e6]`` (above 1024 it warns).
        m1: multiplicative angular margin, ``≥ 1`` in practice, in ``(0, 8]``.
        m2: additive angular margin in radians, in ``[0, π)``.
        m3: additive cosine margin, in ``[0, 2)``.
    """

    paper = "https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch"
    # The default (1.0, 0.3, 0.2) cannot be met in 2-D: cos 0.3 − 0.2 = 0.755 < cos 36° = 0.809.
    settings_2d: ClassVar[Mapping[str, Any]] = {"scale": 16.0, "m1": 1.0, "m2": 0.1, "m3": 0.05}

    @classmethod
    def margin_feasibility(cls, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
        """Warns unless ``cos m2 − m3 > cos δ`` (see :mod:`headreg.heads._geometry`)."""
        return combined_margin_feasibility(options["m1"], options["m2"], options["m3"], embedding_dim, num_classes)

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
    ) -> None:
        super().__init__(in_features, num_classes, scale=scale)
        self.m1 = check_number("m1", m1, low=0.0, high=MAX_M1, low_open=True)
        self.m2 = check_angle("m2", m2)
        self.m3 = check_cosine_margin("m3", m3)

    def margin_target(self, cos_target: Tensor) -> Tensor:
        return combined_margin(cos_target, self.m1, self.m2, self.m3)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}, m1={self.m1:g}, m2={self.m2:g}, m3={self.m3:g}"
