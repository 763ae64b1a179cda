"""The per-chunk arithmetic of the retrieval metrics: from ranked neighbours to sums of P@1, RP, MAP@R, recall@k, k-NN.

Given each query's ranked neighbours (gallery indices, best first, ``-1`` padded), its label and
its number of positives ``R_q``, one chunk of queries adds its terms to running sums; the
caller divides by the number of queries at the end. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import numpy as np
import torch

__all__: list[str] = []


def _knn_vote(neighbour_labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Majority label of each row; a tie goes to the tied label whose first neighbour is nearest.

    Args:
        neighbour_labels: `(c, k)` labels of the k nearest neighbours, best first.
        valid: `(c, k)` which entries are real neighbours.

    Returns:
        `(c,)` predicted labels.
    """
    k = neighbour_labels.shape[1]
    same = (neighbour_labels.unsqueeze(2) == neighbour_labels.unsqueeze(1)) & valid.unsqueeze(1) & valid.unsqueeze(2)
    votes = same.sum(2)  # votes[r, i]: how many valid neighbours share neighbour i's label
    # Among equal vote counts the earliest position wins: that is the nearest neighbour of its label.
    score = votes * (k + 1) + (k - torch.arange(k, device=votes.device))
    score = torch.where(valid, score, torch.full_like(score, -1))
    return neighbour_labels.gather(1, score.argmax(1, keepdim=True)).squeeze(1)


def _chunk_sums(
    nbr: torch.Tensor,
    gallery_labels: torch.Tensor,
    labels: torch.Tensor,
    r: torch.Tensor,
    recall_k: tuple[int, ...],
    knn_k: int,
    r_metrics: bool,
) -> torch.Tensor:
    """Per-chunk sums of the per-query metrics (float64), in the order of `retrieval_metrics`."""
    valid = nbr >= 0
    dev = nbr.device
    if _numpy_path(nbr):  # numpy's gather and compare beat torch's on a CPU here (docs/metrics.md)
        nb = nbr.numpy()
        rel_np = np.take(gallery_labels.numpy(), nb, mode="clip") == labels.numpy()[:, None]
        rel_np &= nb >= 0
        rel = torch.from_numpy(rel_np)
    else:
        rel = (gallery_labels[nbr.clamp(min=0)] == labels.unsqueeze(1)) & valid
    width = rel.shape[1]
    parts = [rel[:, 0].double().sum()]
    if r_metrics:
        parts += _r_sums(rel, r)
    else:
        parts += [torch.zeros((), dtype=torch.float64, device=dev)] * 2
    for k in recall_k:
        parts.append(rel[:, : min(k, width)].any(1).double().sum())
    kk = min(knn_k, width)
    pred = _knn_vote(gallery_labels[nbr[:, :kk].clamp(min=0)], valid[:, :kk])
    parts.append((pred == labels).double().sum())
    return torch.stack([p.to(dev) for p in parts])


def _numpy_path(t: torch.Tensor) -> bool:
    """Whether the per-chunk metric arithmetic runs in numpy (CPU tensors) rather than torch."""
    return t.device.type == "cpu"


def _r_sums(rel: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
    """Sums over the rows of R-precision and AP@R, from `rel` `(c, K)` (relevance by rank) and `r` `(c,)`.

    AP@R = (1/R) · Σ over the relevant ranks i ≤ R of precision@i; at the j-th relevant item
    (rank i) precision@i is j/i, so only the relevant entries are visited.
    """
    rows, width = rel.shape
    if _numpy_path(rel):
        rr = r.numpy()
        row, pos = np.nonzero(rel.numpy() & (np.arange(width) < rr[:, None]))  # row-major: rank order
        hits = np.bincount(row, minlength=rows)
        j = np.arange(1, row.size + 1) - (np.cumsum(hits) - hits)[row]
        ap = np.bincount(row, weights=j / (pos + 1.0), minlength=rows)
        return [
            torch.tensor((hits / rr).sum(), dtype=torch.float64),
            torch.tensor((ap / rr).sum(), dtype=torch.float64),
        ]
    row, pos = (rel & (torch.arange(width, device=rel.device).unsqueeze(0) < r.unsqueeze(1))).nonzero().unbind(1)
    hits = torch.bincount(row, minlength=rows)
    j = torch.arange(1, row.numel() + 1, device=rel.device) - (torch.cumsum(hits, 0) - hits)[row]
    ap = torch.zeros(rows, dtype=torch.float64, device=rel.device).index_add_(0, row, j.double() / (pos + 1).double())
    rd = r.double()
    return [(hits.double() / rd).sum(), (ap / rd).sum()]
