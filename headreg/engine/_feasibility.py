"""Can a head's margin be met at all with ``D``-dimensional features and ``C`` classes?

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
  direction (7.2° for ``m = 4``, ``C = 10`` in 2-D); reported as a note, not a warning.

An infeasible margin still trains (the loss cannot reach its floor and the features bunch
onto the class directions), so this is a warning, never an error.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["TrainingWarning", "MarginFeasibilityWarning", "class_separation", "margin_feasibility"]


class TrainingWarning(UserWarning):
    """Something about a training run's settings the user should know; the run goes on."""


class MarginFeasibilityWarning(TrainingWarning):
    """A head's margin cannot be met with the embedding width and class count asked for."""


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


def _option(head_cls: type | None, options: dict[str, Any], name: str, fallback: Any) -> Any:
    if name in options and options[name] is not None:
        return options[name]
    if head_cls is not None:
        from ..registry import head_defaults

        return head_defaults(head_cls).get(name, fallback)
    return fallback


def margin_feasibility(
    head: str, head_options: dict[str, Any] | None, embedding_dim: int | None, num_classes: int
) -> list[str]:
    """Warnings for margins that ``embedding_dim``-D features of ``num_classes`` classes cannot meet.

    Args:
        head: registry name of the head (``cosface``, ``arcface``, ``combined``, ``sphereface``; others
            have no margin and give no warning).
        head_options: the options the head is built with; missing ones take the head's defaults.
        embedding_dim: width ``D`` of the features the head sees; None skips the check.
        num_classes: number of classes ``C``.

    Returns:
        Human-readable warning lines (empty when the settings are feasible).
    """
    if embedding_dim is None or num_classes < 2:
        return []
    options = dict(head_options or {})
    try:
        from ..registry import get_head_class

        head_cls: type | None = get_head_class(head)
    except Exception:  # noqa: BLE001 - an unknown head is reported by whoever builds it
        head_cls = None
    delta = class_separation(embedding_dim, num_classes)
    where = f"{embedding_dim}-D features and {num_classes} classes"
    sep = f"the class directions can be at most {delta:.3f} rad ({math.degrees(delta):.1f}°) apart"
    out: list[str] = []
    key = head.strip().lower().replace("-", "_")
    if key == "cosface":
        m = float(_option(head_cls, options, "margin", 0.35))
        bound = 1.0 - math.cos(delta)
        if m >= bound:
            out.append(
                f"cosface margin={m:g} cannot be met with {where}: {sep}, so the additive cosine margin must be "
                f"< 1 − cos δ = {bound:.3f}; try margin={0.5 * bound:.2f} or a wider --embedding-dim"
            )
    elif key == "arcface":
        m = float(_option(head_cls, options, "margin", 0.5))
        if m >= delta:
            out.append(
                f"arcface margin={m:g} rad cannot be met with {where}: {sep}, so the additive angular margin must "
                f"be < δ = {delta:.3f} rad; try margin={0.5 * delta:.2f} or a wider --embedding-dim"
            )
    elif key == "combined":
        m1 = float(_option(head_cls, options, "m1", 1.0))
        m2 = float(_option(head_cls, options, "m2", 0.3))
        m3 = float(_option(head_cls, options, "m3", 0.2))
        if math.cos(m2) - m3 <= math.cos(delta):
            out.append(
                f"combined margins (m1={m1:g}, m2={m2:g}, m3={m3:g}) cannot be met with {where}: {sep}, and "
                f"cos(m2) − m3 = {math.cos(m2) - m3:.3f} must exceed cos δ = {math.cos(delta):.3f}"
            )
    if delta == 0.0 and key in ("normface", "modified_softmax", "sphereface", "cosface", "arcface", "combined"):
        out.append(f"{head} normalises features, and {num_classes} classes cannot be separated by angle in 1-D")
    return out
