"""Top-k classification accuracy from a head's logits, and the label rank that defines it."""

from __future__ import annotations

import torch

from headreg._checks import check_logits, check_positive_ints

__all__ = ["label_rank", "labels_outside_head", "topk_accuracy", "topk_from_ranks", "topk_hits"]


def label_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many classes score strictly above each row's label: headreg's one definition of top-k.

    A row is a top-k hit when its rank is below k, so a label tied with the k-th score counts as
    correct, whatever order ``torch.topk`` or ``argmax`` would give the tied classes (docs/metrics.md).
    Training's accuracies, extraction (:class:`~headreg.engine.extract.Extraction`'s ``label_rank``) and
    :func:`topk_accuracy` all rank with this function. No checks: callers validate at their entry points.

    Args:
        logits: ``(B, C)`` scores.
        labels: ``(B,)`` integer labels; one outside ``[0, C)`` gets rank ``C`` (a miss for every k <= C).

    Returns:
        ``(B,)`` int64 ranks on the logits' device, 0 for a top-1 hit.
    """
    c = logits.shape[1]
    valid = (labels >= 0) & (labels < c)
    target = logits.gather(1, labels.clamp(0, c - 1).unsqueeze(1))
    above = (logits > target).sum(1)
    return torch.where(valid, above, torch.full_like(above, c))


def topk_hits(rank: torch.Tensor, top_k: tuple[int, ...]) -> torch.Tensor:
    """``(len(top_k),)`` int64: the number of rows whose :func:`label_rank` is below each k."""
    return torch.stack([(rank < k).sum() for k in top_k])


def topk_from_ranks(rank: torch.Tensor, top_k: tuple[int, ...]) -> dict[str, float]:
    """``{"top1_accuracy": ..., ...}`` from ``(N,)`` label ranks (NaN for N = 0): hits / N per k."""
    n = rank.numel()
    if n == 0:
        return {f"top{k}_accuracy": float("nan") for k in top_k}
    return {f"top{k}_accuracy": int(hits) / n for k, hits in zip(top_k, topk_hits(rank, top_k).tolist(), strict=True)}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, top_k: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label has fewer than k strictly larger logits (:func:`label_rank` < k), for each k.

    Args:
        logits: `(B, C)` float scores.
        labels: `(B,)` integer labels in `[0, C)`.
        top_k: the k values; k >= C gives 1.0.

    Returns:
        `{"top1_accuracy": ..., "top5_accuracy": ...}` (one key per k).
    """
    top_k = check_positive_ints(top_k, "top_k")
    logits, labels = check_logits(logits, labels)
    return topk_from_ranks(label_rank(logits, labels), top_k)


def labels_outside_head(labels: torch.Tensor, num_classes: int) -> list[str]:
    """A warning when some of ``labels`` (``(N,)`` int64) fall outside a head's ``num_classes`` (0: unknown)."""
    if not num_classes or not labels.numel() or int(labels.max()) < num_classes:
        return []
    outside = int((labels >= num_classes).sum())
    return [
        f"{outside} samples have labels outside the head's {num_classes} classes (max label {int(labels.max())}); "
        "they count as misses in top-k accuracy"
    ]
