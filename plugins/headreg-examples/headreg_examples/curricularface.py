"""CurricularFace: an ArcFace positive plus a curriculum that weights hard negatives over training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from headreg.heads import Head, HeadOutput, arcface_margin_feasibility
from headreg.heads.base import check_angle, check_number, check_scale
from headreg.heads.functional import arcface_margin, cosine_linear, replace_target, target_logit
from torch import Tensor, nn

__all__ = ["CurricularFaceHead"]


class CurricularFaceHead(Head):
    """CurricularFace: ``s · cos(θ_y + m)`` for the target, ``s · cos θ_j (t + cos θ_j)`` for hard negatives.

    Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
    Recognition", CVPR 2020, Sec. 3.2. With ``cos θ_j`` the cosine between the embedding
    and class ``j``'s weight and ``y`` the label:

    - positive modulation ``T(cos θ_y) = cos(θ_y + m)``, as ArcFace; where ``θ_y + m > π``
      it is ``cos θ_y − m sin m`` instead, which keeps it decreasing in θ (the reference
      implementations' fallback, ``headreg.heads.functional.arcface_margin``);
    - negative modulation, ``j ≠ y``::

          N(t, cos θ_j) = cos θ_j                 if T(cos θ_y) − cos θ_j ≥ 0   (easy)
                          cos θ_j (t + cos θ_j)   if T(cos θ_y) − cos θ_j < 0   (hard)

    - loss ``−log e^{s T(cos θ_y)} / (e^{s T(cos θ_y)} + Σ_{j≠y} e^{s N(t, cos θ_j)})``;
    - ``t`` a buffer, the running mean of the target cosine, updated in training mode
      before it is used, with ``α = momentum``: ``t ← α · mean_b(cos θ_{y_b}) + (1 − α) · t``,
      ``t₀ = 0``. Early in training ``t ≈ 0`` shrinks hard negatives (easy samples first);
      as ``t`` grows towards 1 they are emphasised.

    The hard/easy split and ``t`` carry no gradient. The authors' code compares the negatives
    with ``cos(θ_y + m)`` before its fallback; the two differ only where ``θ_y + m > π``.
    Without labels the logits are ``s · cos θ``, no margin and no modulation.
    Defaults ``s = 64``, ``m = 0.5`` rad, ``momentum = 0.01`` (the paper's settings).

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        scale: ``s`` in ``(0, 1e6]`` (above 1024 it warns, as the built-in heads).
        margin: additive angular margin ``m`` in radians, ``0 ≤ m < π``.
        momentum: weight ``α`` in ``[0, 1]`` of the current batch in ``t``.

    Shapes:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``, logits ``(B, C)`` float32
        (float64 for float64 input).
    """

    paper = "https://arxiv.org/abs/2004.00288"
    # What headreg asks of a head (docs/plugins.md, "Describe the head"): the logits are s · cos θ,
    # and the target is ArcFace's, so ArcFace's margin bound and 2-D settings apply as they are.
    angular: ClassVar[bool] = True
    settings_2d: ClassVar[Mapping[str, Any]] = {"scale": 16.0, "margin": 0.2}

    @classmethod
    def margin_feasibility(cls, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
        """ArcFace's bound, ``m < δ``: the negatives' modulation does not move the target."""
        return arcface_margin_feasibility(options["margin"], embedding_dim, num_classes)

    def __init__(
        self, in_features: int, num_classes: int, scale: float = 64.0, margin: float = 0.5, momentum: float = 0.01
    ) -> None:
        super().__init__(in_features, num_classes)
        self.scale = check_scale("scale", scale)
        self.margin = check_angle("margin", margin)
        self.momentum = check_number("momentum", momentum, low=0.0, high=1.0)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).normal_(std=0.01))
        self.register_buffer("t", torch.zeros(()))

    def inference_logits(self, x: Tensor) -> Tensor:
        return cosine_linear(x, self.weight.to(x.dtype)) * self.scale

    def shard_refusal(self) -> str:
        return (
            "its hard negatives are modulated by their own row's target cosine cos(θ_y + m) and by t, the running "
            "mean of every target cosine, both held by the rank that owns the target class, so no rank could "
            "score its classes alone"
        )

    @torch.no_grad()
    def _update_t(self, cos_target: Tensor) -> None:
        mean = cos_target.mean()
        new = self.momentum * mean + (1 - self.momentum) * self.t.to(mean.dtype)
        # NaN embeddings give a NaN loss already; they must not also poison t for later steps.
        self.t.copy_(torch.where(torch.isfinite(new), new, self.t.to(new.dtype)))

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:
        cos = cosine_linear(x, self.weight.to(x.dtype))  # (B, C)
        cos_y = target_logit(cos, labels)  # (B,)
        target = arcface_margin(cos_y, self.margin)  # T(cos θ_y)
        if self.training:
            self._update_t(cos_y.detach())
        t = self.t.to(cos.dtype)
        hard = cos.detach() > target.detach().unsqueeze(1)  # the target column is overwritten below
        modulated = torch.where(hard, cos * (t + cos), cos)
        logits = replace_target(modulated, labels, target) * self.scale
        return HeadOutput(loss=F.cross_entropy(logits, labels), logits=logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}, margin={self.margin:g}, momentum={self.momentum:g}"
