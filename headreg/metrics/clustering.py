"""Clustering quality: seeded k-means on the unit sphere, then NMI and AMI against the labels.

k equals the number of distinct labels, as in pytorch-metric-learning's AccuracyCalculator.
Embeddings are L2-normalised first, so k-means runs on the unit sphere (Euclidean
distance there is a monotone function of cosine similarity).

k-means (:func:`kmeans`), on the embeddings' device:

1. **Seeding: D² sampling in rounds.** k-means++ (Arthur & Vassilvitskii, 2007) draws the
   centres one at a time, each in proportion to the squared distance to the nearest centre
   drawn so far: k sequential passes. Here the k centres are drawn in at most
   :data:`SEED_ROUNDS` rounds of ``⌈k / SEED_ROUNDS⌉`` centres each (without replacement,
   from the same D² weights), each round one chunked ``N × m`` distance update. Up to
   ``k = SEED_ROUNDS`` that is exactly k-means++; beyond it, the oversampling idea of
   k-means‖ (Bahmani et al., 2012) without its re-clustering step, since k-means‖'s
   candidate set (about 2k per round) would exceed N at SOP's k = 11,316 for N = 60,502.
2. **Lloyd iterations**, at most ``max_iter`` (20, as pytorch-metric-learning's faiss
   k-means), each one chunked assignment (``N × k`` distances in row blocks of at most
   :data:`_BLOCK_ELEMENTS` entries) and one ``index_add_`` of the centre sums. It stops
   early at a fixed point or when the mean squared centre shift falls below ``tol``.

NMI and AMI come from :mod:`headreg.metrics._mutual_info`: exact, equal to scikit-learn's,
and fast at any number of clusters (torchmetrics' AMI loops in Python over the contingency
cells and is not used).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from headreg._checks import check_embeddings, check_labels, resolve_device
from headreg.errors import InvalidValueError
from headreg.metrics._base import stage_bar
from headreg.metrics._mutual_info import nmi_ami

__all__ = ["DEFAULT_MAX_ITER", "SEED_ROUNDS", "kmeans", "clustering_metrics"]

#: Lloyd iterations at most: headreg runs k-means to convergence, where pytorch-metric-learning's faiss
#: k-means stops at 20 (what that costs the NMI: docs/metrics.md).
DEFAULT_MAX_ITER = 100
#: Seeding draws its k centres in at most this many rounds (exact k-means++ up to this k).
SEED_ROUNDS = 128
#: Entries of one block of the point-to-centre distance matrix (4 MiB in float32: cache-sized).
_BLOCK_ELEMENTS = 1 << 20


def _nearest(x: torch.Tensor, centers: torch.Tensor, x_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest center of each row, `(N,)` each.

    `‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖²`, and `‖x‖²` (`x_sq`, `(N,)`, computed once per run) is the
    same for every centre of a row, so the argmin is taken over `‖c‖² − 2 x·c` alone: one
    `addmm` and one `min` per block of rows, blocks of at most :data:`_BLOCK_ELEMENTS` entries so
    they stay in cache (the retrieval scan's tiles, docs/metrics.md).
    """
    c_sq = (centers * centers).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    chunk = max(1, min(x.shape[0], _BLOCK_ELEMENTS // max(1, centers.shape[0])))
    for s in range(0, x.shape[0], chunk):
        d = torch.addmm(c_sq, x[s : s + chunk], centers.T, alpha=-2.0)
        dist[s : s + chunk], idx[s : s + chunk] = d.min(1)
    return idx, dist.add_(x_sq).clamp_min_(0.0)


def _draw(weights: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """`m` distinct indices drawn in proportion to `weights` (CPU float64); zero-weight ones only to fill up."""
    positive = int((weights > 0).sum())
    if positive >= m:
        return torch.multinomial(weights, m, replacement=False, generator=gen)
    # Fewer points off the centres than centres to place: take all of them, then any others.
    taken = (weights > 0).nonzero().squeeze(1)
    rest = (weights <= 0).nonzero().squeeze(1)
    fill = rest[torch.randperm(rest.numel(), generator=gen)[: m - positive]]
    return torch.cat([taken, fill])


def _seed(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator, bar: Any) -> torch.Tensor:
    """`(k, D)` initial centres by D² sampling in rounds (module docstring, step 1)."""
    n = x.shape[0]
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centers[0] = x[int(torch.randint(0, n, (1,), generator=gen))]
    _, d2 = _nearest(x, centers[:1], x_sq)
    per_round = math.ceil(k / SEED_ROUNDS)
    filled = 1
    while filled < k:
        m = min(per_round, k - filled)
        picks = _draw(d2.double().cpu(), m, gen).to(x.device)
        centers[filled : filled + m] = x[picks]
        d2 = torch.minimum(d2, _nearest(x, centers[filled : filled + m], x_sq)[1])
        filled += m
        bar.update(m)
    return centers


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = 1e-6,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with D²-sampled seeding (k-means++ up to k = :data:`SEED_ROUNDS`), on x's device.

    Args:
        x: `(N, D)` float points.
        k: number of clusters, `1 <= k <= N`.
        max_iter: Lloyd iterations at most.
        tol: stop when the mean squared centre shift falls below this (or no point changes cluster).
        seed: seeds the draws (made on the CPU, so results do not depend on the device).
        progress: a progress bar on stderr, shown once the work has run for 2 s.

    Returns:
        `(assignments, centers)`: `(N,)` int64 cluster of each point, `(k, D)` centres.
        An emptied cluster is re-seeded at the point farthest from its centre.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise InvalidValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    x_sq = (x * x).sum(1)
    with stage_bar("k-means seeding", k, "centre", progress) as bar:
        bar.update(1)
        centers = _seed(x, x_sq, k, gen, bar)
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    moved = True  # the centres changed since `assign` was computed
    with stage_bar("k-means", max_iter, "iter", progress) as bar:
        for _ in range(max_iter):
            previous = assign
            assign, d2 = _nearest(x, centers, x_sq)
            moved = False
            bar.update(1)
            if bool((assign == previous).all()):
                break  # a fixed point: the centres below would not move
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            new = sums / counts.clamp_min(1.0).unsqueeze(1)
            empty = (counts == 0).nonzero().squeeze(1)
            if empty.numel():
                far = torch.topk(d2, empty.numel()).indices
                new[empty] = x[far]
            shift = float(((new - centers) ** 2).sum(1).mean())
            centers, moved = new, True
            if shift < tol:
                break
    if moved:
        assign, _ = _nearest(x, centers, x_sq)
    return assign, centers


def clustering_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_clusters: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    progress: bool = False,
) -> dict[str, float | int]:
    """NMI and AMI between k-means clusters of the embeddings and the labels.

    Args:
        embeddings: `(N, D)` float embeddings (L2-normalised here).
        labels: `(N,)` integer labels.
        num_clusters: k; None uses the number of distinct labels.
        device: where k-means runs; None keeps the embeddings' device.
        seed: seeds the k-means seeding.
        max_iter: Lloyd iterations at most.
        progress: progress bars on stderr for runs longer than 2 s.

    Returns:
        `nmi` (arithmetic-mean normalisation, as scikit-learn's default), `ami`, `num_clusters`.
    """
    check_embeddings(embeddings, min_rows=2)
    labels = check_labels(labels, embeddings.shape[0])
    return _clustering(embeddings, labels, num_clusters, resolve_device(device, embeddings), seed, max_iter, progress)


def _clustering(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_clusters: int | None,
    dev: torch.device,
    seed: int,
    max_iter: int,
    progress: bool,
) -> dict[str, float | int]:
    """:func:`clustering_metrics` on checked input."""
    x = F.normalize(embeddings.detach().to(dev, torch.float32), dim=1)
    k = int(torch.unique(labels).numel()) if num_clusters is None else int(num_clusters)
    assign, _ = kmeans(x, k, seed=seed, max_iter=max_iter, progress=progress)
    nmi, ami = nmi_ami(labels.cpu().numpy(), assign.cpu().numpy(), average_method="arithmetic")
    return {"nmi": nmi, "ami": ami, "num_clusters": k}
