"""Warn before training when a head's margin cannot be met with the features asked for.

The knowledge is the head's: each head class answers through its optional
``margin_feasibility`` classmethod (and its ``angular`` flag), built-in and plugin alike; the
geometry they share is :mod:`headreg.heads._geometry` (``class_separation`` is re-exported
here). This module only resolves the head by name, fills in its defaults and asks. An
infeasible margin still trains, so these are warnings, never errors.
"""

from __future__ import annotations

from typing import Any

from ..heads import class_separation, head_is_angular, head_margin_feasibility

__all__ = ["TrainingWarning", "MarginFeasibilityWarning", "class_separation", "margin_feasibility"]


class TrainingWarning(UserWarning):
    """Something about a training run's settings the user should know; the run goes on."""


class MarginFeasibilityWarning(TrainingWarning):
    """A head's margin cannot be met with the embedding width and class count asked for."""


def margin_feasibility(
    head: str, head_options: dict[str, Any] | None, embedding_dim: int | None, num_classes: int
) -> list[str]:
    """Warnings for margins that ``embedding_dim``-D features of ``num_classes`` classes cannot meet.

    Args:
        head: registry name of the head; an unknown name gives no warning (whoever builds the
            head reports it).
        head_options: the options the head is built with; missing (or None) ones take the head's defaults.
        embedding_dim: width ``D`` of the features the head sees; None skips the check.
        num_classes: number of classes ``C``.

    Returns:
        Human-readable warning lines, each starting with the head's name (empty when the settings
        are feasible or the head has no margin).
    """
    if embedding_dim is None or num_classes < 2:
        return []
    from ..registry import get_head_entry, head_defaults

    try:
        entry = get_head_entry(head)
    except Exception:  # noqa: BLE001 - an unknown head is reported by whoever builds it
        return []
    given = {k: v for k, v in (head_options or {}).items() if v is not None}
    options = {**head_defaults(entry.cls), **given}
    out = [f"{entry.name} {line}" for line in head_margin_feasibility(entry.cls, options, embedding_dim, num_classes)]
    if head_is_angular(entry.cls) and class_separation(embedding_dim, num_classes) == 0.0:
        out.append(f"{head} normalises features, and {num_classes} classes cannot be separated by angle in 1-D")
    return out
