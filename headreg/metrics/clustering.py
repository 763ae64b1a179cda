"""Clustering quality: seeded k-means++ / Lloyd k-means in torch, then NMI and AMI.

k equals the number of distinct labels, as in pytorch-metric-learning's AccuracyCalculator.
Embeddings are L2-normalised first, so k-means runs on the unit sphere (Euclidean
distance there is a monotone function of cosine similarity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.clustering import adjusted_mutual_info_score, normalized_mutual_info_score

from headreg.errors import InvalidValueError
from headreg.metrics._validate import EmbeddingMetric, check_embeddings, check_labels, resolve_device

__all__ = ["kmeans", "clustering_metrics", "ClusteringMetrics"]


def _nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest center of each row, `(N,)` each; O(chunk × k) memory."""
    c_sq = (centers * centers).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        d = (xs * xs).sum(1, keepdim=True) - 2.0 * xs @ centers.T + c_sq
        dist[s : s + chunk], idx[s : s + chunk] = d.min(1)
    return idx, dist.clamp_min(0.0)


def kmeans(
    x: torch.Tensor, k: int, *, max_iter: int = 100, tol: float = 1e-6, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii, 2007), on x's device.

    Args:
        x: `(N, D)` float points.
        k: number of clusters, `1 <= k <= N`.
        max_iter: Lloyd iterations at most.
        tol: stop when the mean squared centre shift falls below this (or no point changes cluster).
        seed: seeds the k-means++ draws (made on the CPU, so results do not depend on the device).

    Returns:
        `(assignments, centers)`: `(N,)` int64 cluster of each point, `(k, D)` centres.
        An emptied cluster is re-seeded at the point farthest from its centre.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise InvalidValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centers[0] = x[int(torch.randint(0, n, (1,), generator=gen))]
    _, d2 = _nearest(x, centers[:1])
    for c in range(1, k):
        w = d2.double().cpu()
        # All points coincide with chosen centres: any point will do.
        pick = (
            int(torch.multinomial(w, 1, generator=gen))
            if float(w.sum()) > 0
            else int(torch.randint(0, n, (1,), generator=gen))
        )
        centers[c] = x[pick]
        d2 = torch.minimum(d2, ((x - centers[c]) ** 2).sum(1))
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        previous = assign
        assign, d2 = _nearest(x, centers)
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
        centers = new
        if shift < tol:
            break
    assign, _ = _nearest(x, centers)
    return assign, centers


def clustering_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_clusters: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    max_iter: int = 100,
) -> dict[str, float | int]:
    """NMI and AMI between k-means clusters of the embeddings and the labels.

    Args:
        embeddings: `(N, D)` float embeddings (L2-normalised here).
        labels: `(N,)` integer labels.
        num_clusters: k; None uses the number of distinct labels.
        device: where k-means runs; None keeps the embeddings' device.
        seed: seeds k-means++.
        max_iter: Lloyd iterations at most.

    Returns:
        `nmi` (arithmetic-mean normalisation, as scikit-learn's default), `ami`, `num_clusters`.
    """
    check_embeddings(embeddings, min_rows=2)
    labels = check_labels(labels, embeddings.shape[0])
    dev = resolve_device(device, embeddings)
    x = F.normalize(embeddings.detach().to(dev, torch.float32), dim=1)
    k = int(torch.unique(labels).numel()) if num_clusters is None else int(num_clusters)
    assign, _ = kmeans(x, k, seed=seed, max_iter=max_iter)
    preds, target = assign.cpu(), labels.cpu()
    # torchmetrics builds its contingency table as a sparse tensor it constructs itself; the
    # invariant-check warning that triggers on every call says nothing about the user's data.
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        nmi = float(normalized_mutual_info_score(preds, target, average_method="arithmetic"))
        ami = float(adjusted_mutual_info_score(preds, target, average_method="arithmetic"))
    return {"nmi": nmi, "ami": ami, "num_clusters": k}


class ClusteringMetrics(EmbeddingMetric):
    """NMI / AMI of k-means clusters over embeddings gathered batch by batch.

    Example:
        >>> import torch
        >>> from headreg.metrics.clustering import ClusteringMetrics
        >>> metric = ClusteringMetrics()
        >>> metric.update(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1]))
        >>> out = metric.compute()
        >>> round(out["nmi"], 6), round(out["ami"], 6), out["num_clusters"]
        (1.0, 1.0, 2)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, seed: int = 0, max_iter: int = 100, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.max_iter = max_iter

    def compute(self) -> dict[str, float | int]:
        """NMI and AMI over everything added since the last reset."""
        emb, lab = self._stored()
        return clustering_metrics(emb, lab, seed=self.seed, max_iter=self.max_iter)
