"""Evaluation metrics: retrieval, verification, clustering and classification.

Each family is a torchmetrics `Metric` (usable in any training loop or Lightning, synced
across processes by torchmetrics) over a pure function that holds the maths.
`compute_metrics` runs the embedding families at once for the CLI. Definitions: docs/metrics.md.
"""

from __future__ import annotations

from headreg.metrics._compute import METRIC_FAMILIES, compute_metrics
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
