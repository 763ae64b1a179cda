"""All embedding metric families in one call: what ``headreg eval`` prints.

:func:`compute_metrics` is the public, checked entry point; :func:`compute_checked` is its core
for callers that have checked their input already (``engine.evaluate``), so one evaluation scans
the embeddings once (:mod:`headreg._checks`).
"""

from __future__ import annotations

import time

import torch

from headreg._checks import check_choice, check_embeddings, check_labels, check_mask, resolve_device
from headreg.metrics.clustering import DEFAULT_MAX_ITER, _clustering
from headreg.metrics.retrieval import RetrievalOptions, _masked
from headreg.metrics.verification import _label_pairs_verification

__all__ = ["METRIC_FAMILIES", "compute_checked", "compute_metrics"]

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
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for name in names:
        check_choice(name, METRIC_FAMILIES, "metric family")
    check_embeddings(embeddings, min_rows=2)
    labels = check_labels(labels, embeddings.shape[0])
    n = embeddings.shape[0]
    for mask, name in ((query_mask, "query_mask"), (gallery_mask, "gallery_mask")):
        if mask is not None:
            check_mask(mask, n, name)
    retrieval = RetrievalOptions(recall_k, knn_k, True, knn_backend, chunk_size, seed, progress)
    dev = resolve_device(device, embeddings)
    return compute_checked(embeddings, labels, query_mask, gallery_mask, names, retrieval, dev, stats)


def compute_checked(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    query_mask: torch.Tensor | None,
    gallery_mask: torch.Tensor | None,
    metrics: tuple[str, ...],
    retrieval: RetrievalOptions,
    device: torch.device,
    stats: dict[str, float] | None = None,
) -> dict[str, float | int]:
    """:func:`compute_metrics` on input its caller has checked (``headreg eval`` checks once, then calls this).

    Nothing here scans the embeddings again: each family runs its unchecked core. The seed and the
    progress flag of ``retrieval`` serve every family.
    """
    seed, progress = retrieval.seed, retrieval.progress
    out: dict[str, float | int] = {"num_samples": int(embeddings.shape[0])}
    families = {
        "retrieval": lambda: _masked(embeddings, labels, query_mask, gallery_mask, device, retrieval),
        "verification": lambda: _label_pairs_verification(embeddings, labels, device, seed, progress),
        "clustering": lambda: _clustering(embeddings, labels, None, device, seed, DEFAULT_MAX_ITER, progress),
    }
    for name in METRIC_FAMILIES:
        if name in metrics:
            start = time.perf_counter()
            out.update(families[name]())
            if stats is not None:
                stats[name] = time.perf_counter() - start
    return out
