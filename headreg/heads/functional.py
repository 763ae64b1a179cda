"""The margin pipeline as pure functions: normalise → cosine → margin → scale → loss.

Built-in heads are a few lines over these; plugin heads may use them too. The last three steps
fused, holding one ``(B, C)`` buffer and shardable by class, are :func:`fused_margin_cross_entropy`
(``heads/_fused.py``).
All angles are in radians.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import HeadregError
from ._fused import FusedLoss, FusedTerms, fused_margin_cross_entropy
from .base import HeadOutput

__all__ = [
    "FusedLoss",
    "FusedTerms",
    "fused_margin_cross_entropy",
    "fused_output",
    "margin_logits",
    "cosine_linear",
    "normalize",
    "target_logit",
    "replace_target",
    "arcface_margin",
    "cosface_margin",
    "combined_margin",
    "sphereface_psi",
    "chebyshev_cos_m_theta",
]


def normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm; zero rows stay zero. ``(B, D) -> (B, D)``."""
    return F.normalize(x, dim=1, eps=eps)


class _CosineLinear(torch.autograd.Function):
    """``cos[b, c] = <x̂_b, w_c> / ‖w_c‖`` without materialising a normalised copy of W.

    The straightforward ``F.linear(x̂, F.normalize(W))`` writes a ``(C, D)`` copy of the
    weights every step and a second one in backward; at C = 100,000 those copies are
    most of the cost of an angular head. Here the row norms are a ``(C,)`` vector and the
    weight gradient is formed in place:

        ∂cos[b,c]/∂w_c = x̂_b/‖w_c‖ − cos[b,c]·w_c/‖w_c‖²
        ⇒ ∇W = (G/‖w‖)ᵀ x̂ − diag(Σ_b (G/‖w‖) ∘ cos) · W/‖w‖
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        inv_norm = torch.linalg.vector_norm(weight, dim=1).clamp_min(eps).reciprocal()
        cos = torch.mm(x, weight.t()).mul_(inv_norm)
        ctx.save_for_backward(x, weight, inv_norm, cos)
        return cos

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, weight, inv_norm, cos = ctx.saved_tensors
        g = grad * inv_norm  # (B, C): gradient w.r.t. x̂·w_c before the 1/‖w_c‖ factor
        grad_x = torch.mm(g, weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            col = torch.einsum("bc,bc->c", g, cos).mul_(inv_norm)  # (C,)
            grad_w = torch.mm(g.t(), x)
            grad_w.addcmul_(weight, col.unsqueeze(1), value=-1.0)
        return grad_x, grad_w, None


def cosine_linear(x: Tensor, weight: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine of the angle between each row of ``x`` and each class weight.

    Args:
        x: ``(B, D)`` embeddings; normalised here.
        weight: ``(C, D)`` class weights, any norm.
        eps: floor of the norms, so a zero row gives cosine 0 rather than NaN.

    Returns:
        ``(B, C)`` cosines in ``[-1, 1]`` (up to rounding).
    """
    x = normalize(x, eps)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _CosineLinear.apply(x, weight, eps)
    # No gradient to shape: the same arithmetic without the autograd Function, which TorchScript's tracer
    # cannot record (headreg export --format torchscript traces under no_grad).
    return torch.mm(x, weight.t()).mul_(torch.linalg.vector_norm(weight, dim=1).clamp_min(eps).reciprocal())


def margin_logits(terms: FusedTerms, weight: Tensor, labels: Tensor, bias: Tensor | None = None) -> Tensor:
    """The ``(B, C)`` logits of the unfused pipeline: ``s·u`` with column ``labels[b]`` set to ``s·ψ(u_y)``.

    What :func:`fused_margin_cross_entropy` computes the loss of, kept as a tensor (with autograd).
    """
    x = terms.embeddings
    u = _CosineLinear.apply(x, weight, 1e-12) if terms.normalize_weight else F.linear(x, weight, bias)
    s = terms.scale
    row = isinstance(s, Tensor) and s.dim() == 1
    logits = u * (s.unsqueeze(1) if row else s)
    if terms.margin_target is None:
        return logits
    target = terms.margin_target(target_logit(u, labels)) * s
    # The product's backward does not need its output, so the target column is overwritten in place.
    return logits.scatter_(1, labels.unsqueeze(1), target.unsqueeze(1).to(logits.dtype))


def fused_output(terms: FusedTerms, weight: Tensor, labels: Tensor, bias: Tensor | None = None) -> HeadOutput:
    """A head's training output through :func:`fused_margin_cross_entropy`: the loss and the top-1 hits.

    The margin logits are not kept (that is the point): ``HeadOutput.logits`` rebuilds them on first
    access with :func:`margin_logits` (differentiable, as the unfused pipeline's), from the weights as
    they were in this forward pass; read after the weights changed, they are refused.
    """
    res = fused_margin_cross_entropy(
        terms.embeddings,
        weight,
        labels,
        terms.margin_target,
        terms.scale,
        bias=bias,
        normalize_weight=terms.normalize_weight,
    )
    versions = [t._version for t in (weight, bias) if t is not None]

    def logits() -> Tensor:
        if [t._version for t in (weight, bias) if t is not None] != versions:
            raise HeadregError(
                "HeadOutput.logits were read after the head's weights changed (optimizer.step()): read them "
                "before the step, or call the head again"
            )
        return margin_logits(terms, weight, labels, bias)

    return HeadOutput(loss=res.loss, top1=res.top1, logits_fn=logits)


def target_logit(logits: Tensor, labels: Tensor) -> Tensor:
    """``logits[b, labels[b]]`` as a ``(B,)`` tensor (an index op, no one-hot)."""
    return logits.gather(1, labels.unsqueeze(1)).squeeze(1)


def replace_target(logits: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """A copy of ``logits`` with column ``labels[b]`` of row ``b`` set to ``target[b]``.

    The input is not modified: the caller's tensor may be needed by autograd.
    """
    return logits.scatter(1, labels.unsqueeze(1), target.unsqueeze(1).to(logits.dtype))


def _sin_from_cos(cos: Tensor) -> Tensor:
    # sqrt'(u) is infinite at u = 0 (θ = 0 or π); the floor keeps the gradient finite
    # (≤ 1/(2·sqrt(eps))) while leaving it exact wherever 1 − cos² > eps.
    eps = torch.finfo(cos.dtype).eps
    return (1.0 - cos * cos).clamp_min(eps).sqrt()


def arcface_margin(cos: Tensor, margin: float, easy_margin: bool = False) -> Tensor:
    """ArcFace's target cosine ``cos(θ + m)`` (Deng et al. 2019, Eq. 3), as a function of ``cos θ``.

    ``cos(θ + m) = cos θ cos m − sin θ sin m``. Where ``θ + m > π`` the curve turns back up,
    so, as in the reference implementations, it is replaced there by ``cos θ − m sin m``,
    which keeps the target logit decreasing in θ. With ``easy_margin`` the margin is only
    applied where ``cos θ > 0``.
    """
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    phi = cos * cos_m - _sin_from_cos(cos) * sin_m
    if easy_margin:
        return torch.where(cos > 0, phi, cos)
    threshold = math.cos(math.pi - margin)  # θ + m = π
    return torch.where(cos > threshold, phi, cos - margin * sin_m)


def cosface_margin(cos: Tensor, margin: float) -> Tensor:
    """CosFace's target cosine ``cos θ − m`` (Wang et al. 2018, Eq. 4)."""
    return cos - margin


def combined_margin(cos: Tensor, m1: float, m2: float, m3: float) -> Tensor:
    """InsightFace's combined target ``cos(m1·θ + m2) − m3``.

    ``(1, 0, 0)`` is no margin, ``(1, m, 0)`` ArcFace, ``(1, 0, m)`` CosFace and ``(m, 0, 0)``
    a multiplicative (SphereFace-like, without its monotone ψ) margin. When ``m1 == 1``
    the ArcFace fallback ``cos θ − m2 sin m2 − m3`` applies where ``θ + m2 > π``, so that
    ``combined(1, m, 0)`` equals ``arcface(m)`` exactly. For ``m1 ≠ 1`` θ comes from acos
    on a clamped cosine (the clamp keeps acos' gradient finite at ±1) and no fallback is
    applied, as in insightface.
    """
    if m1 == 1.0:
        return arcface_margin(cos, m2) - m3 if m2 != 0 else cos - m3
    eps = torch.finfo(cos.dtype).eps
    theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
    return torch.cos(m1 * theta + m2) - m3


def chebyshev_cos_m_theta(cos: Tensor, m: int) -> Tensor:
    """``cos(m·θ)`` as the Chebyshev polynomial ``T_m(cos θ)``, for ``m`` in 1..5.

    A polynomial in ``cos θ`` has an exact, finite gradient everywhere, unlike acos.
    """
    c = cos
    if m == 1:
        return c
    if m == 2:
        return 2 * c**2 - 1
    if m == 3:
        return 4 * c**3 - 3 * c
    if m == 4:
        return 8 * c**4 - 8 * c**2 + 1
    if m == 5:
        return 16 * c**5 - 20 * c**3 + 5 * c
    raise ValueError(f"m must be an integer in 1..5, got {m!r}")


def sphereface_psi(cos: Tensor, m: int) -> Tensor:
    """A-Softmax's ``ψ(θ) = (−1)^k cos(mθ) − 2k`` for ``θ ∈ [kπ/m, (k+1)π/m]`` (Liu et al. 2017, Eq. 7).

    ``k`` is an integer read off a detached θ: it selects the branch and has no gradient.
    ψ decreases monotonically from 1 at θ = 0 to ``1 − 2m`` at θ = π.
    """
    eps = torch.finfo(cos.dtype).eps
    with torch.no_grad():
        theta = torch.acos(cos.detach().clamp(-1.0 + eps, 1.0 - eps))
        k = torch.floor(m * theta / math.pi).clamp_(0, m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)  # (−1)^k
    return sign * chebyshev_cos_m_theta(cos, m) - 2.0 * k
