"""Sub-center ArcFace: K centres per class, so noisy samples can gather around a centre of their own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from headreg.errors import InvalidValueError
from headreg.heads import Head, HeadOutput, arcface_margin_feasibility
from headreg.heads.base import check_angle, check_scale
from headreg.heads.functional import arcface_margin, cosine_linear, replace_target, target_logit
from torch import Tensor, nn

__all__ = ["SubCenterArcFaceHead"]


class SubCenterArcFaceHead(Head):
    """Sub-center ArcFace: cosine to a class is the max over its K sub-centres, then ArcFace.

    Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web
    Faces", ECCV 2020, Sec. 3.1. With ``w_{j,k}`` the ``k``-th of the ``K`` sub-centres of class ``j``::

        cos θ_j = max_k  x·w_{j,k} / (‖x‖ ‖w_{j,k}‖)
        logit_y = s · cos(θ_y + m)        (cos θ_y − m sin m where θ_y + m > π, as ArcFace)
        logit_j = s · cos θ_j              (j ≠ y)

    and the loss is the cross-entropy over these logits. A clean sample and its class's
    dominant sub-centre end up close; a mislabelled one can sit near a non-dominant
    sub-centre instead of pulling the dominant one. (The paper's later step of dropping
    non-dominant sub-centres and re-training is not part of the head.)

    **Weight layout.** For this head ``weight`` has shape ``(num_classes * k, in_features)``
    and holds the sub-centres class-major: row ``j * k + i`` is sub-centre ``i`` of class
    ``j``, so ``weight.view(num_classes, k, in_features)[j]`` are class ``j``'s sub-centres.
    With ``k = 1`` it is ArcFace with the usual ``(num_classes, in_features)`` weight.

    Without labels the logits are ``s · max_k cos θ_{j,k}``, no margin.
    Defaults ``s = 64``, ``m = 0.5`` rad, ``k = 3`` (the paper's settings).

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        scale: ``s`` in ``(0, 1e6]`` (above 1024 it warns, as the built-in heads).
        margin: additive angular margin ``m`` in radians, ``0 ≤ m < π``.
        k: number of sub-centres per class, a positive integer.

    Shapes:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``, logits ``(B, C)`` float32
        (float64 for float64 input).
    """

    paper = "https://github.com/deepinsight/insightface/tree/master/recognition/SubCenter-ArcFace"
    # Angular, with ArcFace's target on the class cosine (the best sub-centre), so ArcFace's margin
    # bound between the classes' dominant sub-centres and its 2-D settings apply.
    angular: ClassVar[bool] = True
    settings_2d: ClassVar[Mapping[str, Any]] = {"scale": 16.0, "margin": 0.2}

    @classmethod
    def margin_feasibility(cls, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
        """ArcFace's bound, ``m < δ``, between the classes' dominant sub-centres."""
        return arcface_margin_feasibility(options["margin"], embedding_dim, num_classes)

    def __init__(
        self, in_features: int, num_classes: int, scale: float = 64.0, margin: float = 0.5, k: int = 3
    ) -> None:
        super().__init__(in_features, num_classes)
        self.scale = check_scale("scale", scale)
        self.margin = check_angle("margin", margin)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidValueError(f"k must be a positive integer (sub-centres per class), got {k!r}")
        self.k = k
        self.weight = nn.Parameter(torch.empty(num_classes * k, in_features).normal_(std=0.01))

    def class_cosine(self, x: Tensor) -> Tensor:
        """``(B, C)`` cosine to each class: the max over its sub-centres of ``(B, C·K)`` cosines."""
        cos = cosine_linear(x, self.weight.to(x.dtype))
        return cos.view(x.shape[0], self.num_classes, self.k).amax(dim=2)

    def shard_refusal(self) -> str:
        return (
            "a class's logit is the max over its K sub-centres' cosines, not one weight row's cosine, which the "
            "class-sharded fused cross-entropy scores (its K rows would shard together; the max is not fused)"
        )

    def inference_logits(self, x: Tensor) -> Tensor:
        return self.class_cosine(x) * self.scale

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:
        cos = self.class_cosine(x)
        target = arcface_margin(target_logit(cos, labels), self.margin)
        logits = replace_target(cos, labels, target) * self.scale
        return HeadOutput(loss=F.cross_entropy(logits, labels), logits=logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}, margin={self.margin:g}, k={self.k}"
