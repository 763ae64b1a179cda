"""AdaFace: a margin that adapts to image quality through the feature norm.

Written as a plain ``nn.Module`` on purpose: it shows the minimum a plugin head needs,
using only headreg's public helpers (``headreg.HeadOutput``, ``check_embeddings``,
``check_labels``, ``float32_region``) and no headreg base class.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from headreg import HeadOutput
from headreg.errors import InvalidValueError
from headreg.heads import check_embeddings, check_labels, cosface_margin_feasibility, float32_region
from headreg.heads.base import MAX_SCALE
from headreg.heads.functional import FusedTerms, fused_output
from torch import Tensor, nn

__all__ = ["AdaFaceHead"]

# Floor and ceiling of the feature norm before it enters the batch statistics (authors' code).
_NORM_MIN, _NORM_MAX = 1e-3, 100.0


def _number(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> float:
    # A bool is not a number and a string is not one either: refuse them rather than convert.
    if isinstance(value, (bool, str, bytes)):
        raise InvalidValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise InvalidValueError(f"{name} must be a finite number in {bracket}{lo:g}, {hi:g}], got {value!r}")
    return v


class AdaFaceHead(nn.Module):
    """AdaFace: an angular plus additive margin whose mix follows the feature norm.

    Kim, Jain and Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022,
    Sec. 3.4. A large feature norm (a good image) gets an ArcFace-like angular margin that
    pushes on hard samples; a small norm (a poor image) gets a CosFace-like additive margin
    that de-emphasises them.

    With ``x_i`` the ``(D,)`` embedding, ``w_j`` the ``(D,)`` weight of class ``j`` and
    ``cos θ_ij = x_i·w_j / (‖x_i‖ ‖w_j‖)``:

    - norm statistics (training mode only, before they are used), with ``α = momentum``::

          z_i = clip(‖x_i‖, 0.001, 100), detached
          μ ← α · mean_i(z_i) + (1 − α) · μ
          σ ← α · std_i(z_i) + (1 − α) · σ          (unbiased std; skipped when B = 1)

    - the normalised norm, ``h = 0.333`` putting one standard deviation at ``±h``::

          ẑ_i = clip((z_i − μ) / (σ + ε) · h, −1, 1)                  i.e. (z_i − μ)/(σ/h)

    - the margins and the target logit, ``ε = 0.001``::

          g_angle = −m · ẑ_i,    g_add = m · ẑ_i + m
          logit_{i,y_i} = s · (cos(clip(θ_{i,y_i} + g_angle, ε, π − ε)) − g_add)
          logit_{i,j}   = s · cos θ_ij                                  (j ≠ y_i)

    ``ẑ`` carries no gradient. ``θ`` comes from ``acos`` of the cosine clamped to
    ``[−1 + δ, 1 − δ]``, δ the dtype's machine epsilon, so its gradient stays finite at 0 and π.
    Without labels the logits are ``s · cos θ``, no margin. Defaults ``s = 64``, ``m = 0.4``,
    ``h = 0.333``, ``momentum = 0.01``, and the initial ``μ = 20``, ``σ = 100`` of the authors' code.
    Under ``DistributedDataParallel`` the statistics are those of each rank's batch (and its
    default ``broadcast_buffers`` copies rank 0's buffers to the others each step).

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        scale: ``s`` in ``(0, 1e6]``.
        margin: ``m ≥ 0`` in radians (angular part) and cosine units (additive part), ``< π``.
        h: concentration ``h > 0`` of the normalised norm, at most 1.
        momentum: weight ``α`` in ``[0, 1]`` of the current batch in the running statistics.

    Shapes:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``, logits ``(B, C)`` float32
        (float64 for float64 input).
    """

    paper = "https://arxiv.org/abs/2204.00964"
    #: ẑ is detached by design, so finite differences in the embeddings see a dependence
    #: autograd does not: headreg's contract test then gradchecks the weight only.
    gradcheck_embeddings = False
    # How headreg's trainer, compare and margin check see this head (docs/plugins.md, "Describe the
    # head"); plain class attributes, since nothing here subclasses headreg's Head. The logits are
    # s · cos θ (the norm only sets the margin), so the decision is by angle.
    angular = True
    # As CosFace's: at the mean norm AdaFace's margin is CosFace's; an s that a 10-class softmax does
    # not saturate.
    settings_2d = {"scale": 16.0, "margin": 0.1}

    @classmethod
    def margin_feasibility(cls, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
        """CosFace's bound ``m < 1 − cos δ``, for a feature of average quality.

        The margin moves with the feature norm, from ArcFace's ``cos(θ + m)`` (``ẑ = −1``) through
        CosFace's ``cos θ − m`` (``ẑ = 0``, a norm at the running mean) to ``cos(θ − m) − 2m``
        (``ẑ = 1``). No single bound holds for every sample; the one at the mean norm is the one
        most samples meet or miss, so that is what is checked.
        """
        lines = cosface_margin_feasibility(options["margin"], embedding_dim, num_classes)
        return [f"{line} (at the mean feature norm, where AdaFace's margin is CosFace's)" for line in lines]

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        momentum: float = 0.01,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.scale = _number("scale", scale, 0.0, MAX_SCALE, lo_open=True)
        self.margin = _number("margin", margin, 0.0, math.pi)
        if self.margin == math.pi:
            raise InvalidValueError(f"margin must be in [0, π) radians, got {margin!r}")
        self.h = _number("h", h, 0.0, 1.0, lo_open=True)
        self.momentum = _number("momentum", momentum, 0.0, 1.0)
        self.eps = 1e-3
        # (C, D) like nn.Linear; the norm of a class weight does not enter the logits.
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).normal_(std=0.01))
        # Running statistics are state, not parameters: buffers follow .to(), .double()
        # and the state_dict, and the optimiser never sees them.
        self.register_buffer("norm_mean", torch.tensor(20.0))
        self.register_buffer("norm_std", torch.tensor(100.0))

    # Class-sharded training (headreg train --shard-head): the margin moves the target column only, row by
    # row, so each rank scores its block of classes through fused_terms; the norm statistics then see the
    # global (all-gathered) batch, so every rank's buffers stay equal to one process's.
    shardable = True

    def _cosine(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight.to(x.dtype), dim=1))

    @torch.no_grad()
    def _update_statistics(self, norms: Tensor) -> None:
        a = self.momentum
        mean = norms.mean()
        # A non-finite batch (NaN embeddings) must not poison the running statistics
        # for every later step; torch.where keeps the old value without a host sync.
        new_mean = torch.where(torch.isfinite(mean), a * mean + (1 - a) * self.norm_mean.to(mean.dtype), self.norm_mean)
        self.norm_mean.copy_(new_mean)
        if norms.numel() > 1:  # the unbiased std of one sample is undefined
            std = norms.std()
            new_std = torch.where(torch.isfinite(std), a * std + (1 - a) * self.norm_std.to(std.dtype), self.norm_std)
            self.norm_std.copy_(new_std)

    def fused_terms(self, x: Tensor) -> FusedTerms:
        """The fused loss's terms (``headreg.heads.functional``): ``x̂``, ``s`` and the row-wise target.

        The target of row ``i`` depends on its own ``ẑ_i`` (a constant here), so it is a per-row
        transform of the target cosine, which is what the fused loss asks of a head. Called once per
        training step: in training mode it updates the norm statistics first.
        """
        norms = torch.linalg.vector_norm(x.detach(), dim=1).clamp(_NORM_MIN, _NORM_MAX)
        if self.training:
            self._update_statistics(norms)
        mean, std = self.norm_mean.to(x.dtype), self.norm_std.to(x.dtype)
        z_hat = ((norms - mean) / (std + self.eps) * self.h).clamp(-1.0, 1.0)  # (B,), no gradient
        g_angle = -self.margin * z_hat
        g_add = self.margin * z_hat + self.margin
        delta, eps = torch.finfo(x.dtype).eps, self.eps

        def target(cos_y: Tensor) -> Tensor:
            theta = torch.acos(cos_y.clamp(-1.0 + delta, 1.0 - delta))
            return torch.cos((theta + g_angle).clamp(eps, math.pi - eps)) - g_add

        return FusedTerms(F.normalize(x, dim=1), self.scale, target)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> HeadOutput | Tensor:
        """Margin-free logits (no labels), or loss and AdaFace logits (with labels).

        Args:
            embeddings: ``(B, D)`` floating tensor, not normalised: its norm is the quality signal.
            labels: optional ``(B,)`` integer class indices in ``[0, C)``.

        Returns:
            ``(B, C)`` logits ``s · cos θ`` without labels, else ``HeadOutput(loss, logits)``
            with the margin on the target column and ``loss`` the mean cross-entropy, computed by
            headreg's fused margin cross-entropy (one ``(B, C)`` buffer; the logits are rebuilt
            only if read).
        """
        check_embeddings(embeddings, self.in_features)
        if labels is not None:
            check_labels(labels, embeddings.shape[0], self.num_classes)
        with float32_region(embeddings) as dtype:
            x = embeddings.to(dtype)
            if labels is None:
                return self._cosine(x) * self.scale
            return fused_output(self.fused_terms(x), self.weight.to(dtype), labels)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, scale={self.scale:g}, "
            f"margin={self.margin:g}, h={self.h:g}, momentum={self.momentum:g}"
        )
