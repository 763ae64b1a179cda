"""Evaluation metrics: retrieval, verification, clustering and classification.

Each family is a torchmetrics `Metric` (usable in any training loop or Lightning, synced
across processes by torchmetrics) over a pure function that holds the maths.
`compute_metrics` runs the embedding families at once for the CLI. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import time

import torch

from headreg.errors import UnknownNameError, did_you_mean
from headreg.metrics._validate import check_embeddings, check_labels
from headreg.metrics.classification import ClassificationAccuracy, topk_accuracy
from headreg.metrics.clustering import ClusteringMetrics, clustering_metrics, kmeans
from headreg.metrics.retrieval import RetrievalMetrics, retrieval_metrics, retrieval_with_masks
from headreg.metrics.verification import (
    VerificationMetrics,
    sample_pairs,
    verification_from_scores,
    verification_metrics,
)

__all__ = [
    "METRIC_FAMILIES",
    "compute_metrics",
    "retrieval_metrics",
    "retrieval_with_masks",
    "verification_metrics",
    "verification_from_scores",
    "sample_pairs",
    "clustering_metrics",
    "kmeans",
    "topk_accuracy",
    "RetrievalMetrics",
    "VerificationMetrics",
    "ClusteringMetrics",
    "ClassificationAccuracy",
]

METRIC_FAMILIES = ("retrieval", "verification", "clustering")


def compute_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    query_mask: torch.Tensor | None = None,
    gallery_mask: torch.Tensor | None = None,
    metrics: tuple[str, ...] = METRIC_FAMILIES,
    recall_k: tuple[int, ...] = (1, 2, 4, 8),
    knn_k: int = 5,
    device: str | torch.device | None = None,
    knn_backend: str = "torch",
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    stats: dict[str, float] | None = None,
) -> dict[str, float | int]:
    """All embedding metrics in one flat, JSON-ready dict (what `headreg eval` prints).

    Args:
        embeddings: `(N, D)` float embeddings.
        labels: `(N,)` integer labels.
        query_mask: `(N,)` bool, the retrieval queries; None: all (leave-one-out with no masks).
        gallery_mask: `(N,)` bool, the retrieval gallery; None: all.
        metrics: families to compute, any of `"retrieval"`, `"verification"`, `"clustering"`.
        recall_k: k of each `recall_at_k`.
        knn_k: neighbours voting in `knn_accuracy`.
        device: where to compute; None keeps the embeddings' device.
        knn_backend: `"torch"` or `"faiss"` for the retrieval k-NN search.
        chunk_size: queries per similarity chunk; None picks one (512 on a CPU).
        seed: seeds pair sampling, k-means++ and threshold sampling.
        progress: progress bars on stderr: over the retrieval chunks, and for the verification
            and clustering stages once one has run for 2 s.
        stats: if given, filled with each family's wall time in seconds (``"retrieval"``, ...).

    Returns:
        The union of `retrieval_metrics` (`precision_at_1`, `recall_at_k`, `r_precision`,
        `mean_average_precision_at_r`, `knn_accuracy`, `num_queries`, `num_gallery`,
        `num_queries_without_positive`), `verification_metrics` (`roc_auc`, `eer`,
        `tar_at_far_1e-2` ..., `verification_accuracy`, `verification_threshold`,
        `num_positive_pairs`, `num_negative_pairs`) and `clustering_metrics` (`nmi`, `ami`,
        `num_clusters`), plus `num_samples`. Verification and clustering use all samples.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    for name in metrics:
        if name not in METRIC_FAMILIES:
            raise UnknownNameError(
                f"unknown metric family {name!r}{did_you_mean(name, METRIC_FAMILIES)} "
                f"(expected any of {', '.join(METRIC_FAMILIES)})"
            )
    check_embeddings(embeddings, min_rows=2)
    labels = check_labels(labels, embeddings.shape[0])
    out: dict[str, float | int] = {"num_samples": int(embeddings.shape[0])}
    families = {
        "retrieval": lambda: retrieval_with_masks(
            embeddings,
            labels,
            query_mask=query_mask,
            gallery_mask=gallery_mask,
            recall_k=recall_k,
            knn_k=knn_k,
            device=device,
            knn_backend=knn_backend,
            chunk_size=chunk_size,
            seed=seed,
            progress=progress,
        ),
        "verification": lambda: verification_metrics(embeddings, labels, device=device, seed=seed, progress=progress),
        "clustering": lambda: clustering_metrics(embeddings, labels, device=device, seed=seed, progress=progress),
    }
    for name in METRIC_FAMILIES:
        if name in metrics:
            start = time.perf_counter()
            out.update(families[name]())
            if stats is not None:
                stats[name] = time.perf_counter() - start
    return out
