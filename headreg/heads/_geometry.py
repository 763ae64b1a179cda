"""Can a margin be met at all with ``D``-dimensional features and ``C`` classes?

A margin head asks every feature to sit closer (in angle) to its own class weight than to
any other, by a margin. How far apart ``C`` class directions can be is fixed by geometry:
in the plane the best arrangement spreads them evenly, ``δ = 2π/C`` apart; with
``D ≥ C − 1`` they form a regular simplex, ``δ = arccos(−1/(C − 1))``; in between (the
Tammes problem) there is no closed form and the simplex angle is an upper bound.

The most favourable feature lies on its own class direction (``θ_y = 0``) with the nearest
other class at ``δ``. If even that feature cannot meet the margin, no feature can:

- CosFace, ``cos θ_y − m > cos θ_j``: needs ``m < 1 − cos δ`` (0.191 for ``C = 10`` in 2-D);
- ArcFace, ``cos(θ_y + m) > cos θ_j``: needs ``m < δ`` (``2π/10 = 0.628`` rad in 2-D), and
  features meet it only within ``(δ − m)/2`` of their class direction;
- combined ``cos(m1 θ_y + m2) − m3 > cos θ_j``: needs ``cos m2 − m3 > cos δ``;
- SphereFace ``cos(m θ_y) > cos θ_j`` can always be met, within ``δ/(m + 1)`` of the class
  direction (7.2° for ``m = 4``, ``C = 10`` in 2-D).

An infeasible margin still trains (the loss cannot reach its floor and the features bunch
onto the class directions), so these are warnings, never errors. Each function returns the
lines a head's ``margin_feasibility`` hook returns: sentences with the head's name left out
(``"margin=0.35 cannot be met with ..."``), which headreg puts in front. A plugin head with
one of these margins on its target (CurricularFace and Sub-center ArcFace use ArcFace's)
calls the function rather than repeating the bound.
"""

from __future__ import annotations

import math

__all__ = [
    "class_separation",
    "cosface_margin_feasibility",
    "arcface_margin_feasibility",
    "combined_margin_feasibility",
]


def class_separation(embedding_dim: int, num_classes: int) -> float:
    """Largest possible smallest angle (radians) between ``num_classes`` directions in ``embedding_dim`` dimensions.

    Exact for ``D = 1``, ``D = 2`` and ``D ≥ C − 1``; the simplex angle (an upper bound) otherwise.
    """
    c, d = int(num_classes), int(embedding_dim)
    if c <= 1:
        return math.pi
    if d == 1:
        return math.pi if c == 2 else 0.0
    if d == 2:
        return 2.0 * math.pi / c
    return math.acos(-1.0 / (c - 1))


def _limits(embedding_dim: int, num_classes: int) -> tuple[float, str]:
    """``δ`` and the clause every message shares: where, and how far apart the classes can be."""
    delta = class_separation(embedding_dim, num_classes)
    where = (
        f"{embedding_dim}-D features and {num_classes} classes: the class directions can be at most "
        f"{delta:.3f} rad ({math.degrees(delta):.1f}°) apart"
    )
    return delta, where


def cosface_margin_feasibility(margin: float, embedding_dim: int, num_classes: int) -> list[str]:
    """Warning lines for an additive cosine margin, target ``cos θ_y − m`` (CosFace).

    Args:
        margin: ``m`` in cosine units.
        embedding_dim: feature width ``D``.
        num_classes: number of classes ``C``.

    Returns:
        One line when ``m ≥ 1 − cos δ``, else none.
    """
    m = float(margin)
    delta, where = _limits(embedding_dim, num_classes)
    bound = 1.0 - math.cos(delta)
    if m < bound:
        return []
    return [
        f"margin={m:g} cannot be met with {where}, so the additive cosine margin must be "
        f"< 1 − cos δ = {bound:.3f}; try margin={0.5 * bound:.2f} or a wider --embedding-dim"
    ]


def arcface_margin_feasibility(margin: float, embedding_dim: int, num_classes: int) -> list[str]:
    """Warning lines for an additive angular margin, target ``cos(θ_y + m)`` (ArcFace and its variants).

    Args:
        margin: ``m`` in radians.
        embedding_dim: feature width ``D``.
        num_classes: number of classes ``C``.

    Returns:
        One line when ``m ≥ δ``, else none.
    """
    m = float(margin)
    delta, where = _limits(embedding_dim, num_classes)
    if m < delta:
        return []
    return [
        f"margin={m:g} rad cannot be met with {where}, so the additive angular margin must "
        f"be < δ = {delta:.3f} rad; try margin={0.5 * delta:.2f} or a wider --embedding-dim"
    ]


def combined_margin_feasibility(m1: float, m2: float, m3: float, embedding_dim: int, num_classes: int) -> list[str]:
    """Warning lines for insightface's combined margin, target ``cos(m1 θ_y + m2) − m3``.

    Args:
        m1: multiplicative angular margin (does not enter the bound: ``θ_y = 0`` is the best case).
        m2: additive angular margin in radians.
        m3: additive cosine margin.
        embedding_dim: feature width ``D``.
        num_classes: number of classes ``C``.

    Returns:
        One line when ``cos m2 − m3 ≤ cos δ``, else none.
    """
    m1, m2, m3 = float(m1), float(m2), float(m3)
    delta, where = _limits(embedding_dim, num_classes)
    if math.cos(m2) - m3 > math.cos(delta):
        return []
    return [
        f"margins (m1={m1:g}, m2={m2:g}, m3={m3:g}) cannot be met with {where}, and "
        f"cos(m2) − m3 = {math.cos(m2) - m3:.3f} must exceed cos δ = {math.cos(delta):.3f}"
    ]
