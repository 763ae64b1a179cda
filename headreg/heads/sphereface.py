"""SphereFace (A-Softmax): a multiplicative angular margin with λ annealing."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidValueError
from .base import Head, HeadOutput, check_number
from .functional import FusedTerms, cosine_linear, fused_output, normalize, sphereface_psi, target_logit

__all__ = ["SphereFaceHead"]


class SphereFaceHead(Head):
    """A-Softmax: unit-norm weights, feature norm kept, target logit ``‖x‖ ψ(θ_y)``.

    Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.
    ``ψ(θ) = (−1)^k cos(mθ) − 2k`` for ``θ ∈ [kπ/m, (k+1)π/m]`` (Eq. 7), with ``cos(mθ)``
    as a Chebyshev polynomial of ``cos θ`` and ``k`` read off a detached θ. Training is
    stabilised as in the authors' Caffe code by blending with the plain logit,

        f_y = ‖x‖ (λ cos θ_y + ψ(θ_y)) / (1 + λ),
        λ = max(λ_min, base · (1 + γ · t)^(−power)),

    with ``t`` the number of training steps taken (a buffer, saved with the model, that
    advances only in training mode and only when labels are given). Defaults are the
    original schedule: ``m = 4``, base 1000, γ 0.12, power 1, λ_min 5. ``focal_gamma > 0``
    swaps cross-entropy for the focal loss ``−(1 − p_y)^γ log p_y`` offered by the authors'
    PyTorch port; 0 (default) is plain cross-entropy.

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        margin: the integer ``m`` in 1..5 (1 is modified softmax).
        base: λ at step 0 (before the floor), in ``[0, 1e6]``.
        gamma: λ decay rate per step, in ``[0, 1000]``.
        power: λ decay exponent, in ``[0, 100]``.
        lambda_min: floor of λ, in ``[0, 1e6]``; 0 gives the pure A-Softmax target in the end.
        focal_gamma: focal-loss exponent, in ``[0, 100]``.
    """

    paper = "https://arxiv.org/abs/1704.08063"
    # The decision is by angle. No margin_feasibility: cos(m θ_y) > cos θ_j can always be met, within
    # δ/(m + 1) of the class direction (7.2° for m = 4 and 10 classes in 2-D), so m = 4 and the λ
    # annealing suit 2-D features as they are (settings_2d left empty).
    angular: ClassVar[bool] = True
    shardable: ClassVar[bool] = True  # column c is ‖x‖ cos θ_c, the target's ψ blend on the target column only

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        margin: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        focal_gamma: float = 0.0,
    ) -> None:
        super().__init__(in_features, num_classes)
        if isinstance(margin, bool) or not isinstance(margin, int) or not 1 <= margin <= 5:
            if isinstance(margin, float) and margin.is_integer() and 1 <= margin <= 5:
                margin = int(margin)
            else:
                raise InvalidValueError(f"margin must be an integer m in 1..5 for sphereface, got {margin!r}")
        self.margin = margin
        # Bounded so that λ·cos θ and (1 + λ) stay finite in float32 (λ = 1e300 would give inf/inf = NaN).
        self.base = check_number("base", base, low=0.0, high=1e6)
        self.gamma = check_number("gamma", gamma, low=0.0, high=1e3)
        self.power = check_number("power", power, low=0.0, high=100.0)
        self.lambda_min = check_number("lambda_min", lambda_min, low=0.0, high=1e6)
        self.focal_gamma = check_number("focal_gamma", focal_gamma, low=0.0, high=100.0)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).normal_(std=0.01))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    @property
    def lambda_(self) -> float:
        """λ for the current step."""
        t = int(self.iteration)
        return max(self.lambda_min, self.base * (1.0 + self.gamma * t) ** (-self.power))

    def inference_logits(self, x: Tensor) -> Tensor:
        return cosine_linear(x, self.weight.to(x.dtype)) * x.norm(dim=1, keepdim=True)

    def shard_refusal(self) -> str:
        if self.focal_gamma:
            return "focal_gamma > 0: the focal loss is not the softmax cross-entropy the sharded loss computes"
        return ""

    def _step(self) -> float:
        """λ for this training step; the step counter advances (in training mode)."""
        lam = self.lambda_
        if self.training:
            self.iteration += 1
        return lam

    def fused_terms(self, x: Tensor) -> FusedTerms | None:
        """``x̂``, the per-row scale ``‖x‖`` and the blended target ``(λ u + ψ(u)) / (1 + λ)``; advances the step.

        None with the focal loss, which is not a cross-entropy.
        """
        if self.focal_gamma != 0:
            return None
        lam, m = self._step(), self.margin
        return FusedTerms(normalize(x), x.norm(dim=1), lambda u: (lam * u + sphereface_psi(u, m)) / (1.0 + lam))

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:
        terms = self.fused_terms(x)
        if terms is not None:
            return fused_output(terms, self.weight.to(x.dtype), labels)
        lam = self._step()
        x_norm = x.norm(dim=1, keepdim=True)
        cos = cosine_linear(x, self.weight.to(x.dtype))
        cos_t = target_logit(cos, labels)
        target = (lam * cos_t + sphereface_psi(cos_t, self.margin)) / (1.0 + lam)
        logits = (cos * x_norm).scatter_(1, labels.unsqueeze(1), (target * x_norm.squeeze(1)).unsqueeze(1))
        log_pt = target_logit(F.log_softmax(logits, dim=1), labels)
        loss = -((1.0 - log_pt.exp()) ** self.focal_gamma * log_pt).mean()
        return HeadOutput(loss=loss, logits=logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, lambda={self.lambda_:g}, iteration={int(self.iteration)}"
