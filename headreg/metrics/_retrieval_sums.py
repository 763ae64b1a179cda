"""The per-chunk arithmetic of the retrieval metrics: from ranked neighbours to sums of P@1, RP, MAP@R, recall@k, k-NN.

Given each query's ranked neighbours (gallery indices, best first, ``-1`` padded), its label and
its number of positives ``R_q``, one chunk of queries adds its terms to running sums
(:class:`RetrievalSums`); the caller divides by the number of queries at the end. Definitions:
docs/metrics.md.

The 0/1 terms (P@1, recall@k, k-NN) add up exactly in float64. R-precision and AP@R are fractions:
their per-query values are kept (two float64 per query) and summed once at the end with
``math.fsum``, which rounds the exact sum once, so the result does not depend on how the queries
were chunked: the per-query scan, the leave-one-out scan's blocks and a gallery-sharded run over W
processes give the same bits.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["RetrievalSums"]


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
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One chunk's terms: the sums of the 0/1 metrics (float64, `retrieval_metrics`'s order, zeros in the places
    of R-precision and AP@R), and the per-query R-precision and AP@R (`(c,)` float64 each; none without
    `r_metrics`)."""
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
    parts = [rel[:, 0].double().sum(), *[torch.zeros((), dtype=torch.float64, device=dev)] * 2]
    per_query = _r_terms(rel, r) if r_metrics else []
    for k in recall_k:
        parts.append(rel[:, : min(k, width)].any(1).double().sum())
    kk = min(knn_k, width)
    pred = _knn_vote(gallery_labels[nbr[:, :kk].clamp(min=0)], valid[:, :kk])
    parts.append((pred == labels).double().sum())
    return torch.stack([p.to(dev) for p in parts]), per_query


def _numpy_path(t: torch.Tensor) -> bool:
    """Whether the per-chunk metric arithmetic runs in numpy (CPU tensors) rather than torch."""
    return t.device.type == "cpu"


def _r_terms(rel: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
    """Per-row R-precision and AP@R, `(c,)` float64 each, from `rel` `(c, K)` (relevance by rank) and `r` `(c,)`.

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
        return [torch.from_numpy(hits / rr), torch.from_numpy(ap / rr)]
    row, pos = (rel & (torch.arange(width, device=rel.device).unsqueeze(0) < r.unsqueeze(1))).nonzero().unbind(1)
    hits = torch.bincount(row, minlength=rows)
    j = torch.arange(1, row.numel() + 1, device=rel.device) - (torch.cumsum(hits, 0) - hits)[row]
    ap = torch.zeros(rows, dtype=torch.float64, device=rel.device).index_add_(0, row, j.double() / (pos + 1).double())
    rd = r.double()
    return [hits.double() / rd, ap / rd]


class RetrievalSums:
    """The running sums of `retrieval_metrics`, the same whatever the chunking (module docstring).

    Args:
        recall_k: the k of each `recall_at_k`.
        knn_k: neighbours voting in `knn_accuracy`.
        r_metrics: keep R-precision and AP@R.
        device: where the 0/1 sums accumulate.
    """

    def __init__(self, recall_k: tuple[int, ...], knn_k: int, r_metrics: bool, device: torch.device) -> None:
        self.recall_k, self.knn_k, self.r_metrics = recall_k, knn_k, r_metrics
        self.counts = torch.zeros(3 + len(recall_k) + 1, dtype=torch.float64, device=device)
        self.per_query: list[list[torch.Tensor]] = [[], []]

    def add(self, nbr: torch.Tensor, gallery_labels: torch.Tensor, labels: torch.Tensor, r: torch.Tensor) -> None:
        """Add one chunk: `(c, L)` neighbours, the gallery's labels, the queries' `(c,)` labels and `R_q`."""
        counts, terms = _chunk_sums(nbr, gallery_labels, labels, r, self.recall_k, self.knn_k, self.r_metrics)
        self.counts += counts
        for kept, t in zip(self.per_query, terms, strict=False):
            kept.append(t.cpu())

    def totals(self) -> torch.Tensor:
        """The sums, float64, in `retrieval_metrics`' order (R-precision and AP@R rounded once, by `math.fsum`)."""
        out = self.counts.cpu().clone()
        for i, kept in enumerate(self.per_query, start=1):
            if kept:
                out[i] = math.fsum(torch.cat(kept).tolist())
        return out
