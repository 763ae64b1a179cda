"""Evaluation metrics: retrieval, verification, clustering and classification.

Each family is a pure function that holds the maths (checked at its entry, over an unchecked
core), and a torchmetrics `Metric` over it, usable in any training loop or Lightning and synced
across processes by torchmetrics. `compute_metrics` runs the embedding families at once for the
CLI. The `Metric` classes live in `headreg.metrics._torchmetrics` and are imported on first use,
since importing torchmetrics takes about 2 s. Definitions: docs/metrics.md.
"""

from __future__ import annotations

from typing import Any

from headreg.metrics._compute import METRIC_FAMILIES, compute_metrics
from headreg.metrics.classification import topk_accuracy
from headreg.metrics.clustering import clustering_metrics, kmeans
from headreg.metrics.retrieval import retrieval_metrics, retrieval_with_masks
from headreg.metrics.verification import sample_pairs, verification_from_scores, verification_metrics

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

_METRIC_CLASSES = ("RetrievalMetrics", "VerificationMetrics", "ClusteringMetrics", "ClassificationAccuracy")


def __getattr__(name: str) -> Any:
    if name in _METRIC_CLASSES:
        from headreg.metrics import _torchmetrics

        return getattr(_torchmetrics, name)
    raise AttributeError(f"module 'headreg.metrics' has no attribute {name!r}")
