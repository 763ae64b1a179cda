"""The margin and the softmax cross-entropy fused, holding one ``(B, C)`` buffer, sharded or not.

The unfused pipeline (``heads/margin.py``) keeps the cosine matrix for backward next to the
logits and the softmax: about 1.7× the memory of ``F.linear`` + ``F.cross_entropy`` at
C = 100,000. Here forward writes the cosines into one buffer and turns that buffer, in place,
into ``exp(logit − max) / ‖w_c‖``; backward reads the buffer as it is (so it can run twice, as
``retain_graph`` and ``gradcheck`` do) and forms every gradient from two matrix products.

With ``u[b, c] = x̂_b·w_c / ‖w_c‖`` (``= x_b·w_c + b_c`` for a linear head), the logits are
``ℓ[b, c] = s_b·u[b, c]`` off the target and ``ℓ[b, y_b] = s_b·ψ(u[b, y_b])`` on it, and with
``G = ∂L/∂ℓ = (softmax(ℓ) − onehot(y)) / B`` and ``A = ∂L/∂u`` (``s_b G``, times ``ψ'`` on the
target column):

    ∇x̂_b = Σ_c A[b,c] w_c / ‖w_c‖
    ∇w_c = P_c − (P_c·w_c) w_c / ‖w_c‖²,  P_c = Σ_b A[b,c] x̂_b / ‖w_c‖   (tangent to w_c)
    ∇s_b = Σ_c G[b,c]·ℓ[b,c] / s_b

The target column differs from the rest by a ``(B,)`` correction, applied with a gather and an
``index_add`` (no one-hot). Everything that depends on ``1/Z_b`` (the softmax denominator) is
folded into ``(B, D)`` operands, so the buffer needs no normalising pass.

Class sharding (Partial FC, An et al. 2021): each rank holds a contiguous block of class rows
starting at ``class_offset``; the row maximum and the target logit (one MAX), then the sum of
exponentials (one SUM) are all-reduced over ``group`` (``(B,)`` vectors, never the ``(B, C)`` matrix), so
every rank gets the exact loss of the softmax over all classes. A label outside the block
contributes no target column on that rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["FusedLoss", "FusedTerms", "fused_margin_cross_entropy"]

#: Rows per chunk of the label-rank comparison, as elements: bounds its boolean temporary to 4 MiB.
_RANK_CHUNK = 1 << 22


class FusedLoss(NamedTuple):
    """What :func:`fused_margin_cross_entropy` returns.

    Attributes:
        loss: scalar mean cross-entropy over the batch (the same value on every rank of ``group``).
        label_rank: ``(B,)`` int64 number of classes whose margin-free logit ``s_b·u[b, c]`` is strictly
            above the label's (over all ranks of ``group``), as ``metrics.classification.label_rank``; None
            unless ``with_rank`` (it costs a compare pass over the buffer).
        target: ``(B,)`` detached target logits ``s_b·ψ(u[b, y_b])`` (over all ranks of ``group``).
        top1: ``(B,)`` bool, no margin-free logit strictly above the label's (``label_rank == 0``, ties
            counting as hits), from the row maximum the loss needs anyway.
    """

    loss: Tensor
    label_rank: Tensor | None
    target: Tensor
    top1: Tensor


@dataclass(frozen=True)
class FusedTerms:
    """What a head on the margin path feeds :func:`fused_margin_cross_entropy`, besides its weights.

    A head returns these from ``fused_terms(x)`` (see :class:`~headreg.heads.base.Head`); whoever holds
    the class weights (the head itself, or a class-sharded wrapper holding one block of them) calls
    ``fused_margin_cross_entropy(t.embeddings, weight, labels, t.margin_target, t.scale,
    normalize_weight=t.normalize_weight, bias=...)``.

    Attributes:
        embeddings: ``(B, D)`` rows dotted with the class weights: normalised for a cosine head.
        scale: ``s``: a float, a 0-d tensor (learned) or a ``(B,)`` tensor (per row, e.g. ``‖x‖``).
        margin_target: ``ψ`` on the ``(B,)`` target values, row by row; None: no margin.
        normalize_weight: cosine head (True) or linear head (False).
    """

    embeddings: Tensor
    scale: float | Tensor
    margin_target: Callable[[Tensor], Tensor] | None
    normalize_weight: bool = True


def _all_reduce(t: Tensor, group: Any, op: str) -> None:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)


def _count_above(buf: Tensor, target: Tensor) -> Tensor:
    """``(buf > target[:, None]).sum(1)`` in row chunks, so the boolean temporary stays small."""
    rows = max(1, _RANK_CHUNK // max(buf.shape[1], 1))
    return torch.cat([(buf[i : i + rows] > target[i : i + rows, None]).sum(1) for i in range(0, buf.shape[0], rows)])


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off: the products, the margin and the softmax run in the inputs' own dtype."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _target_terms(margin_target: Callable[[Tensor], Tensor] | None, u_t: Tensor) -> tuple[Tensor, Tensor]:
    """``ψ(u_t)`` and ``ψ'(u_t)``, by autograd on the ``(B,)`` slice (ψ acts row by row)."""
    if margin_target is None:
        return u_t, torch.ones_like(u_t)
    with torch.enable_grad():
        leaf = u_t.detach().requires_grad_(True)
        psi = margin_target(leaf)
        if not psi.requires_grad:  # ψ constant in u
            return psi.detach(), torch.zeros_like(u_t)
        (dpsi,) = torch.autograd.grad(psi.sum(), leaf)
    return psi.detach(), dpsi


class _FusedMarginCE(torch.autograd.Function):
    """Mean cross-entropy of ``s·u`` with the target column replaced by ``s·ψ(u_t)``; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        scale: Tensor | None,
        scale_value: float,
        local: Tensor,
        owned: Tensor,
        margin_target: Callable[[Tensor], Tensor] | None,
        normalize_weight: bool,
        eps: float,
        group: Any,
        with_rank: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        classes = weight.shape[0]
        inv = torch.linalg.vector_norm(weight, dim=1).clamp_min(eps).reciprocal() if normalize_weight else None
        buf = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        col = local.unsqueeze(1)
        zeros = torch.zeros_like(owned, dtype=x.dtype)
        # u at the label, read before scaling: the same rounding as the cosine matrix's own column.
        u_t = buf.gather(1, col).squeeze(1) if classes else zeros
        if inv is not None and classes:
            u_t = u_t * inv[local]
        u_t = torch.where(owned, u_t, zeros)  # rows labelled elsewhere: a safe 0 for ψ
        # The margin-free logits s·u, in place: one pass with the column factors folded together.
        row_scale = scale is not None and scale.dim() == 1
        col_factor: Tensor | float | None = inv
        if scale is not None and not row_scale:
            col_factor = scale if inv is None else inv * scale
        elif scale is None and scale_value != 1.0:
            col_factor = scale_value if inv is None else inv * scale_value
        if col_factor is not None:
            buf.mul_(col_factor)
        if row_scale:
            buf.mul_(scale.unsqueeze(1))
        s = (scale if scale is not None else torch.full_like(u_t, scale_value)).expand_as(u_t)
        psi, dpsi = _target_terms(margin_target, u_t)
        here = buf.gather(1, col).squeeze(1) if classes else zeros  # the margin-free target logit
        ninf = torch.full_like(here, float("-inf"))
        free_t = torch.where(owned, here, ninf)
        target = free_t if margin_target is None else torch.where(owned, s * psi, ninf)
        # The row maximum without the target column (which leaves the loss exact and gives the top-1 test:
        # no other logit strictly above the label's), then with the target logit: one pass over the buffer.
        if classes:
            buf.scatter_(1, col, torch.where(owned, ninf, here).unsqueeze(1))
            top_other = buf.amax(1)
        else:
            top_other = ninf.clone()
        if group is not None:  # one MAX over the ranks: the (−inf off-shard) target logits come along
            both = torch.stack([top_other, free_t, target])
            _all_reduce(both, group, "max")
            top_other, free_t, target = both[0], both[1], both[2]
        top1 = free_t >= top_other
        rank = _count_above(buf, free_t) if with_rank else torch.zeros(0, dtype=torch.long, device=x.device)
        top = torch.maximum(top_other, target)
        if classes:
            buf.scatter_(1, col, torch.where(owned, target, here).unsqueeze(1))
        buf.sub_(top.unsqueeze(1)).exp_()
        z = buf.sum(1)
        if group is not None:
            if with_rank:
                both = torch.stack([z, rank.to(z.dtype)])
                _all_reduce(both, group, "sum")
                z, rank = both[0], both[1].round().long()
            else:
                _all_reduce(z, group, "sum")
        if inv is not None:
            buf.mul_(inv)  # E = exp(ℓ − max) / ‖w_c‖: both backward products read it as it is
        p_t = torch.exp(target - top) / z
        loss = (z.log() + top - target).mean()
        ctx.save_for_backward(x, weight, inv, buf, z, p_t, u_t, psi, dpsi, local, owned, scale)
        ctx.scale_value = scale_value
        ctx.mark_non_differentiable(rank, target, top1)
        return loss, rank, target, top1

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        with _no_autocast(grad_loss):
            return _FusedMarginCE._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple[Any, ...]:
        x, weight, inv, buf, z, p_t, u_t, psi, dpsi, local, owned, scale = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        zero = torch.zeros_like(p_t)
        k = grad_loss / x.shape[0]
        rz = k / z  # softmax = E·‖w_c‖ / Z, so 1/Z goes into the (B,) factors
        g_t = torch.where(owned, k * (p_t - 1.0), zero)  # ∂L/∂(target logit)
        # Column y_b of A minus what the matrix term already holds there (k·p_t·s_b/‖w_y‖ via E):
        corr = torch.where(owned, g_t * dpsi - k * p_t, zero)
        s = (scale if scale is not None else torch.full_like(p_t, ctx.scale_value)).expand_as(p_t)
        inv_y = inv[local] if inv is not None and weight.shape[0] else None
        w_y = weight[local] if weight.shape[0] else torch.zeros_like(x)
        grad_x = grad_w = grad_b = grad_s = None
        if need_x or need_s:
            m = torch.mm(buf, weight).mul_(rz.unsqueeze(1))  # Σ_c k·p[b,c]·w_c/‖w_c‖
            if need_s:
                # Σ_c G ℓ / s over the full row: the plain columns (x̂·m) and the target's ψ instead of u.
                gs = torch.einsum("bd,bd->b", x, m) - torch.where(owned, k * p_t * u_t, zero) + g_t * psi
                grad_s = gs if scale.dim() == 1 else gs.sum().reshape(scale.shape)
            if need_x:
                c = corr if inv_y is None else corr * inv_y
                grad_x = m.addcmul_(w_y, c.unsqueeze(1)).mul_(s.unsqueeze(1))
        if need_w or need_b:
            factor = rz * s
            if need_w:
                grad_w = torch.mm(buf.t(), x * factor.unsqueeze(1))
                c = corr * s if inv_y is None else corr * s * inv_y
                if weight.shape[0]:  # an empty block has no row to correct (and index 0 would be out of range)
                    grad_w.index_add_(0, local, x * c.unsqueeze(1))
                if inv is not None:  # keep the component tangent to w_c: the logits ignore ‖w_c‖
                    radial = torch.einsum("cd,cd->c", grad_w, weight).mul_(inv * inv)
                    grad_w.addcmul_(weight, radial.unsqueeze(1), value=-1.0)
            if need_b:
                grad_b = torch.mv(buf.t(), factor)
                if weight.shape[0]:
                    grad_b.index_add_(0, local, corr * s)
        return grad_x, grad_w, grad_b, grad_s, None, None, None, None, None, None, None, None


def fused_margin_cross_entropy(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin_target: Callable[[Tensor], Tensor] | None = None,
    scale: float | Tensor = 1.0,
    *,
    bias: Tensor | None = None,
    normalize_weight: bool = True,
    class_offset: int = 0,
    index: Tensor | None = None,
    group: Any = None,
    with_rank: bool = False,
    eps: float = 1e-12,
) -> FusedLoss:
    """Mean cross-entropy of ``s·u`` with the target column replaced by ``s·ψ(u_y)``, in one ``(B, C)`` buffer.

    ``u[b, c] = x_b·w_c / ‖w_c‖`` (the cosine when ``x`` is normalised), or ``x_b·w_c + bias_c`` with
    ``normalize_weight=False``. Equal to ``F.cross_entropy(replace_target(s·u, y, s·ψ(u_y)), y)`` up to
    rounding, with its gradients with respect to ``x``, ``weight``, ``bias`` and a tensor ``scale``.

    Runs with autocast off, in the dtype of ``x`` (float32, or float64 for checks); ``weight``, ``bias`` and a
    tensor ``scale`` must have that dtype.

    Args:
        x: ``(B, D)`` embeddings, already normalised for a cosine head (``heads.functional.normalize``).
        weight: ``(C_local, D)`` class weights, any norm (raw: the norm is divided out without a copy).
        labels: ``(B,)`` int64 global class ids, trusted (check them first; under ``group``, on every rank
            before any collective). Rows whose label is not in this block add no target column here.
        margin_target: ``ψ``, from ``(B,)`` target values ``u_y`` to the target before scaling, row by row
            (row b's result depends on ``u_y[b]`` only), e.g. a head's ``margin_target``. None: no margin.
            Called once per forward; rows labelled on another rank are given 0 and their result is
            discarded. Tensors it closes over receive no gradient (a learned margin cannot be fused).
        scale: ``s``: a float, a 0-d tensor (a learned scale gets its gradient) or a ``(B,)`` tensor of
            per-row scales (SphereFace's ``‖x‖``, differentiable).
        bias: optional ``(C_local,)`` bias, added after the product (a linear head; needs
            ``normalize_weight=False``).
        normalize_weight: divide each class row by its norm (cosine heads); False for a linear head.
        class_offset: the global id of ``weight``'s first row (Partial FC's shard start). 0 unsharded.
        index: optional ``(K,)`` int64 rows of ``weight`` kept this step (Partial FC sampling, offsets
            relative to ``weight``); the softmax runs over those rows only, labels map to their position.
            Every label in this block must be among them. ``weight[index]`` is a ``(K, D)`` copy.
        group: a ``torch.distributed`` process group over which ``weight`` is split by rows; None: not
            sharded. ``x`` and ``labels`` must then be the same (all-gathered) batch on every rank; the
            gradient of ``x`` returned here covers this rank's classes only, so the all-gather's
            backward must sum it over the ranks (reduce-scatter), as Partial FC's does.
        with_rank: also return each label's full rank under the margin-free logits (one compare pass over
            the buffer); ``top1`` comes free either way.
        eps: floor of the weight norms.

    Returns:
        :class:`FusedLoss` ``(loss, label_rank, target, top1)``.

    Memory: one ``(B, C_local)`` buffer of ``x``'s dtype from forward to backward (plus a 4 MiB boolean
    chunk for the rank); backward adds only ``(B, D)`` and ``(C_local, D)`` products (the gradients).
    """
    if bias is not None and normalize_weight:
        raise ValueError("bias needs normalize_weight=False (a cosine head has no bias)")
    if index is not None:
        block = weight.shape[0]
        weight = weight.index_select(0, index)
        bias = None if bias is None else bias.index_select(0, index)
        position = torch.full((block,), -1, dtype=torch.long, device=labels.device)
        position[index] = torch.arange(index.numel(), device=labels.device)
        rel = labels - class_offset
        inside = (rel >= 0) & (rel < block)
        pos = position[rel.clamp(0, max(block - 1, 0))]
        owned = inside & (pos >= 0)
        local = torch.where(owned, pos, torch.zeros_like(pos))
    else:
        rel = labels - class_offset
        owned = (rel >= 0) & (rel < weight.shape[0])
        local = torch.where(owned, rel, torch.zeros_like(rel))
    scale_t = scale if isinstance(scale, Tensor) else None
    scale_value = 1.0 if scale_t is not None else float(scale)
    with _no_autocast(x):
        loss, rank, target, top1 = _FusedMarginCE.apply(
            x, weight, bias, scale_t, scale_value, local, owned, margin_target, normalize_weight, eps, group, with_rank
        )
    return FusedLoss(loss, rank if with_rank else None, target, top1)
