"""Verification on pairs: ROC-AUC, EER, TAR@FAR and best-threshold accuracy of cosine scores.

A pair (i, j) is "same" when both carry one label. Its score is the cosine similarity
of the two embeddings; a higher score means "more likely the same".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from headreg._checks import check_embeddings, check_labels, resolve_device
from headreg.errors import InvalidInputError, InvalidValueError
from headreg.metrics._base import stage_bar

__all__ = ["roc_counts", "roc_curve", "sample_pairs", "verification_metrics", "verification_from_scores"]

DEFAULT_MAX_PAIRS = 1_000_000
# A normalised copy of all rows is made when it fits in this many float32 entries (128 MiB).
_WHOLE_ELEMENTS = 1 << 25
DEFAULT_FAR_TARGETS = (1e-2, 1e-3, 1e-4)
# Up to this many candidate pairs are enumerated (80 MB of indices); beyond it pairs are drawn.
_ENUMERABLE = 5_000_000


def _far_key(far: float) -> str:
    """`1e-3` -> `"tar_at_far_1e-3"`."""
    mantissa, exponent = f"{far:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"tar_at_far_{mantissa}e{int(exponent)}"


def roc_curve(scores: Tensor, same: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ROC of pair scores, one point per distinct score, in float64 (scikit-learn's `roc_curve`
    without `drop_intermediate`).

    Args:
        scores: `(P,)` finite scores, higher = more likely the same identity.
        same: `(P,)` bool, with at least one True and one False.

    Returns:
        `(fpr, tpr, thresholds)`, each `(T + 1,)`: point `t` accepts the pairs scoring at least
        `thresholds[t]`. The first point accepts nothing; its threshold is the next float above the
        highest score.
    """
    fps, tps, thresholds = roc_counts(scores, same)
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tps / tps[-1]])
    fpr = torch.cat([zero, fps / fps[-1]])
    top = torch.nextafter(thresholds[:1], torch.full((1,), math.inf, dtype=torch.float64))
    return fpr, tpr, torch.cat([top, thresholds])


def roc_counts(scores: Tensor, same: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """False and true accepts at each distinct score, highest first (scikit-learn's ``_binary_clf_curve``).

    Returns:
        ``(fps, tps, thresholds)``, float64 ``(T,)``: accepting the pairs scoring at least ``thresholds[t]``
        accepts ``fps[t]`` different and ``tps[t]`` same pairs (exact integers).
    """
    s = scores.double()
    order = torch.argsort(s, descending=True, stable=True)
    s = s[order]
    accepted = torch.cumsum(same[order], 0, dtype=torch.float64)  # exact integers; one (P,) buffer less
    del order
    # The last pair of each run of equal scores: the ROC moves only between distinct scores.
    last = torch.cat([torch.nonzero(s[1:] != s[:-1]).squeeze(1), torch.tensor([s.numel() - 1], device=s.device)])
    tps = accepted[last]
    del accepted
    fps = last.double().add_(1).sub_(tps)
    return fps, tps, s[last]


def verification_from_scores(
    scores: torch.Tensor, same: torch.Tensor, far_targets: tuple[float, ...] = DEFAULT_FAR_TARGETS
) -> dict[str, float | int]:
    """ROC-derived metrics of pair scores.

    Args:
        scores: `(P,)` float scores, higher = more likely the same identity.
        same: `(P,)` bool, whether each pair is a genuine (same-label) pair.
        far_targets: false-accept rates at which to report the true-accept rate.

    Returns:
        `roc_auc`; `eer` (where FAR = FRR, linearly interpolated between ROC points);
        `tar_at_far_{f}` (the highest TAR over thresholds whose FAR <= f; NaN when there are
        fewer than 1/f negative pairs, as such a FAR cannot be resolved); `verification_accuracy`
        (best accuracy over all thresholds) and its `verification_threshold`;
        `num_positive_pairs`, `num_negative_pairs`.
    """
    if scores.ndim != 1 or same.shape != scores.shape:
        raise InvalidInputError(
            f"scores and same must both have shape (P,), got {tuple(scores.shape)} and {tuple(same.shape)}"
        )
    if not bool(torch.isfinite(scores).all()):
        raise InvalidInputError(f"scores must be finite, got {int((~torch.isfinite(scores)).sum())} non-finite")
    same = same.bool()
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise InvalidInputError(
            f"verification needs both positive and negative pairs, got {n_pos} positive and {n_neg} negative"
        )
    fpr, tpr, thr = roc_curve(scores, same)
    auc = float(torch.trapz(tpr, fpr))
    fnr = 1.0 - tpr
    # EER: first ROC point where FNR <= FPR, interpolated with the point before it.
    i = int(torch.nonzero(fnr <= fpr)[0, 0])
    if i == 0:
        eer = float(fpr[0])
    else:
        d0, d1 = float(fnr[i - 1] - fpr[i - 1]), float(fnr[i] - fpr[i])
        w = d0 / (d0 - d1) if d0 != d1 else 0.0
        eer = float((fpr[i - 1] + w * (fpr[i] - fpr[i - 1]) + fnr[i - 1] + w * (fnr[i] - fnr[i - 1])) / 2)
    out: dict[str, float | int] = {"roc_auc": auc, "eer": eer}
    for far in far_targets:
        if n_neg * far < 1.0:
            out[_far_key(far)] = float("nan")
        else:
            out[_far_key(far)] = float(tpr[fpr <= far + 1e-12].max())
    acc = (tpr * n_pos + (1.0 - fpr) * n_neg) / (n_pos + n_neg)
    best = int(acc.argmax())
    out["verification_accuracy"] = float(acc[best])
    out["verification_threshold"] = float(thr[best])
    out["num_positive_pairs"] = n_pos
    out["num_negative_pairs"] = n_neg
    return out


def _within_class_pairs(order: Tensor, starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Every pair ``i < j`` (in class order) of two members of one class, class by class.

    Classes of one size share one ``triu_indices``, so the work is a loop over the distinct class
    sizes (at most ``√(2N)`` of them), never over the classes (SOP has 11,316).
    """
    sizes = torch.unique(counts[counts >= 2])
    pi, pj = [], []
    for m in sizes.tolist():
        first = starts[counts == m]  # where each class of this size starts in `order`
        a, b = torch.triu_indices(m, m, offset=1)
        pi.append(order[(first.unsqueeze(1) + a).flatten()])
        pj.append(order[(first.unsqueeze(1) + b).flatten()])
    if not pi:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    # Back into class order, as enumerating class by class gives.
    i, j = torch.cat(pi), torch.cat(pj)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    keep = torch.argsort(rank[i] * order.numel() + rank[j])
    return i[keep], j[keep]


def sample_pairs(
    labels: torch.Tensor, *, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All positive pairs and all negative pairs, each capped at `max_pairs` by seeded sampling.

    Args:
        labels: `(N,)` int64 labels (on CPU or not; pairs are built on the CPU).
        max_pairs: cap on positive pairs and, separately, on negative pairs.
        seed: seeds the sampling.

    Returns:
        `(i, j, same)`: `(P,)` int64 indices with `i < j` (enumerated) and `(P,)` bool.
        When a kind has at most `max_pairs` pairs, all are used; otherwise `max_pairs` are
        drawn: without replacement when there are at most 5M pairs to enumerate, else
        with replacement (class drawn in proportion to its pair count, then two distinct
        members; negatives drawn uniformly with rejection of same-label draws).
    """
    if max_pairs < 1:
        raise InvalidValueError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    y = labels.cpu().long()
    n = y.numel()
    gen = torch.Generator().manual_seed(int(seed))
    classes, counts = torch.unique(y, return_counts=True)
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos_per_class = counts * (counts - 1) // 2
    n_pos = int(pos_per_class.sum())
    n_neg = n * (n - 1) // 2 - n_pos
    enumerable = _ENUMERABLE
    if n_pos <= enumerable:
        pos_i, pos_j = _within_class_pairs(order, starts, counts)
        if pos_i.numel() > max_pairs:
            pick = torch.randperm(pos_i.numel(), generator=gen)[:max_pairs]
            pos_i, pos_j = pos_i[pick], pos_j[pick]
    else:
        cls = torch.multinomial(pos_per_class.double(), max_pairs, replacement=True, generator=gen)
        a = (torch.rand(max_pairs, generator=gen) * counts[cls]).long()
        b = (torch.rand(max_pairs, generator=gen) * (counts[cls] - 1)).long()
        b = b + (b >= a).long()  # a second, distinct member
        pos_i, pos_j = order[starts[cls] + a], order[starts[cls] + b]
    if n * (n - 1) // 2 <= enumerable:
        a, b = torch.triu_indices(n, n, offset=1)
        keep = y[a] != y[b]
        neg_i, neg_j = a[keep], b[keep]
        if neg_i.numel() > max_pairs:
            pick = torch.randperm(neg_i.numel(), generator=gen)[:max_pairs]
            neg_i, neg_j = neg_i[pick], neg_j[pick]
    else:
        want = min(max_pairs, n_neg)
        got_i, got_j, have = [], [], 0
        while have < want:
            a = torch.randint(0, n, (2 * (want - have) + 16,), generator=gen)
            b = torch.randint(0, n, (a.numel(),), generator=gen)
            keep = y[a] != y[b]
            got_i.append(a[keep])
            got_j.append(b[keep])
            have += int(keep.sum())
        neg_i, neg_j = torch.cat(got_i)[:want], torch.cat(got_j)[:want]
    i = torch.cat([pos_i, neg_i])
    j = torch.cat([pos_j, neg_j])
    same = torch.cat([torch.ones(pos_i.numel(), dtype=torch.bool), torch.zeros(neg_i.numel(), dtype=torch.bool)])
    return i, j, same


def verification_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    far_targets: tuple[float, ...] = DEFAULT_FAR_TARGETS,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float | int]:
    """Verification metrics of cosine scores on label-derived or explicit pairs.

    Args:
        embeddings: `(N, D)` float embeddings.
        labels: `(N,)` integer labels; pairs are drawn by `sample_pairs`. Not needed with `pairs`.
        pairs: explicit `(i, j, same)`: `(P,)` int64 indices into `embeddings` and `(P,)` bool.
        max_pairs: cap per kind (positive, negative) for label-derived pairs.
        far_targets: FARs of the `tar_at_far_*` keys.
        device: where to compute the scores; None keeps the embeddings' device.
        seed: seeds the pair sampling.
        progress: a progress bar on stderr over the pair scores, shown once they take over 2 s.

    Returns:
        See `verification_from_scores`. Time and memory are O(pairs), whatever N is.
    """
    check_embeddings(embeddings, min_rows=2)
    n = embeddings.shape[0]
    if pairs is None:
        if labels is None:
            raise InvalidInputError("verification_metrics needs labels or explicit pairs")
        labels = check_labels(labels, n)
        i, j, same = sample_pairs(labels, max_pairs=max_pairs, seed=seed)
    else:
        if len(pairs) != 3:
            raise InvalidInputError(f"pairs must be a tuple (i, j, same), got {len(pairs)} items")
        i, j, same = (torch.as_tensor(p) for p in pairs)
        if i.ndim != 1 or i.shape != j.shape or i.shape != same.shape:
            raise InvalidInputError(
                "pairs (i, j, same) must be three (P,) tensors, "
                f"got {tuple(i.shape)}, {tuple(j.shape)}, {tuple(same.shape)}"
            )
        if i.is_floating_point() or j.is_floating_point():
            raise InvalidInputError(f"pair indices must be integers, got {i.dtype} and {j.dtype}")
        i, j = i.long().cpu(), j.long().cpu()
        lo, hi = (int(torch.minimum(i, j).min()), int(torch.maximum(i, j).max())) if i.numel() else (0, 0)
        if lo < 0 or hi >= n:
            raise InvalidInputError(f"pair indices must lie in [0, {n}), got [{lo}, {hi}]")
        same = same.bool().cpu()
    return _verification(embeddings, i, j, same, resolve_device(device, embeddings), far_targets, progress)


def _verification(
    embeddings: Tensor,
    i: Tensor,
    j: Tensor,
    same: Tensor,
    dev: torch.device,
    far_targets: tuple[float, ...],
    progress: bool,
) -> dict[str, float | int]:
    """:func:`verification_metrics` on checked input and pairs: cosine scores in blocks, then the ROC."""
    x = embeddings.detach()
    step = 1 << 13  # cache-sized (step, D) gathers, 4 MiB at D = 128 (larger blocks were slower: docs/benchmarks.md)
    # Fewer rows than pairs, and a normalised copy of them within 128 MiB: normalise every row once;
    # else only the gathered rows, so memory stays bounded whatever N is. Row-wise normalisation
    # commutes with the gather, so both give the same scores.
    n, d = embeddings.shape
    whole = n <= i.numel() and n * d <= _WHOLE_ELEMENTS
    if whole:
        x = F.normalize(x.to(dev, torch.float32), dim=1)
    scores = torch.empty(i.numel(), dtype=torch.float32, device=dev)
    with stage_bar("verification pairs", i.numel(), "pair", progress) as bar:
        for s in range(0, i.numel(), step):
            a = x[i[s : s + step].to(x.device)].to(dev, torch.float32)
            b = x[j[s : s + step].to(x.device)].to(dev, torch.float32)
            if not whole:
                a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            scores[s : s + step] = (a * b).sum(1)
            bar.update(a.shape[0])
    return verification_from_scores(scores.cpu(), same, far_targets)


def _label_pairs_verification(
    embeddings: Tensor, labels: Tensor, dev: torch.device, seed: int, progress: bool
) -> dict[str, float | int]:
    """The default verification (label-derived pairs, default caps and FARs) on checked input."""
    i, j, same = sample_pairs(labels, max_pairs=DEFAULT_MAX_PAIRS, seed=seed)
    return _verification(embeddings, i, j, same, dev, DEFAULT_FAR_TARGETS, progress)
