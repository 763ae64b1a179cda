"""The torchmetrics faces of the metric families: ``Metric`` classes for any training loop or Lightning.

Each class keeps its batches as states that torchmetrics synchronises across processes (the stored
embeddings with ``dist_reduce_fx="cat"``, classification counts with ``"sum"``), checks each batch
in ``update`` (:mod:`headreg._checks`) and computes with the unchecked core of its family. This
module alone imports torchmetrics (about 2 s: it imports torchvision), and ``headreg.metrics``
imports it on first use of a class, so ``headreg eval`` and ``headreg train`` never pay for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from headreg._checks import check_embeddings, check_labels, check_logits, check_mask, check_positive_ints
from headreg.errors import InvalidInputError
from headreg.metrics.classification import label_rank, topk_hits
from headreg.metrics.clustering import DEFAULT_MAX_ITER, _clustering
from headreg.metrics.retrieval import RetrievalOptions, _masked
from headreg.metrics.verification import DEFAULT_FAR_TARGETS, DEFAULT_MAX_PAIRS, _verification, sample_pairs

__all__ = ["ClassificationAccuracy", "ClusteringMetrics", "EmbeddingMetric", "RetrievalMetrics", "VerificationMetrics"]


class EmbeddingMetric(Metric):
    """A torchmetrics ``Metric`` that keeps every ``(embeddings, labels)`` batch until ``compute``.

    The list states are concatenated across processes by torchmetrics (``dist_reduce_fx="cat"``),
    so a subclass computes over the whole set; it implements ``compute`` with :meth:`_stored`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: `(B, D)` float embeddings and `(B,)` integer labels."""
        check_embeddings(embeddings)
        self.embeddings.append(embeddings.detach())
        self.labels.append(check_labels(labels, embeddings.shape[0]))

    def _stored(self, min_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything added since the last reset, ``(N, D)`` and ``(N,)`` (each batch was checked in ``update``)."""
        if not self.embeddings:
            raise InvalidInputError(f"{type(self).__name__}.compute() called before any update()")
        emb = torch.cat(self.embeddings) if isinstance(self.embeddings, list) else self.embeddings
        lab = torch.cat(self.labels) if isinstance(self.labels, list) else self.labels
        if emb.shape[0] < min_rows:
            raise InvalidInputError(f"embeddings must have at least {min_rows} rows, got {emb.shape[0]}")
        return emb, lab


class RetrievalMetrics(Metric):
    """Leave-one-out (or query/gallery) retrieval metrics over embeddings gathered batch by batch.

    States are the embeddings and labels themselves (`dist_reduce_fx="cat"`), so under
    DDP every process sees all samples at `compute()`. See `retrieval_metrics` for the
    definitions and arguments.

    Example:
        >>> import torch
        >>> from headreg.metrics import RetrievalMetrics
        >>> metric = RetrievalMetrics(recall_k=(1, 2))
        >>> emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> metric.update(emb, torch.tensor([0, 0, 1, 1]))
        >>> out = metric.compute()
        >>> out["precision_at_1"], out["mean_average_precision_at_r"], out["recall_at_2"]
        (1.0, 1.0, 1.0)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        recall_k: tuple[int, ...] = (1, 2, 4, 8),
        knn_k: int = 5,
        knn_backend: str = "torch",
        chunk_size: int | None = None,
        seed: int = 0,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.options = RetrievalOptions(recall_k, knn_k, True, knn_backend, chunk_size, seed)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("is_query", default=[], dist_reduce_fx="cat")
        self.add_state("is_gallery", default=[], dist_reduce_fx="cat")

    def update(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        is_query: torch.Tensor | None = None,
        is_gallery: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: `(B, D)` embeddings, `(B,)` labels, optional `(B,)` bool query/gallery flags."""
        check_embeddings(embeddings)
        labels = check_labels(labels, embeddings.shape[0])
        n = embeddings.shape[0]
        ones = torch.ones(n, dtype=torch.bool, device=embeddings.device)
        for name, flag in (("is_query", is_query), ("is_gallery", is_gallery)):
            if flag is not None:
                check_mask(flag, n, name, nonempty=False)  # a batch may hold no query; the whole set must
        self.embeddings.append(embeddings.detach())
        self.labels.append(labels)
        self.is_query.append(ones if is_query is None else is_query.to(embeddings.device))
        self.is_gallery.append(ones if is_gallery is None else is_gallery.to(embeddings.device))

    def compute(self) -> dict[str, float | int]:
        """All retrieval metrics over everything added since the last reset."""
        if not self.embeddings:
            raise InvalidInputError("RetrievalMetrics.compute() called before any update()")
        emb = torch.cat(self.embeddings) if isinstance(self.embeddings, list) else self.embeddings
        lab = torch.cat(self.labels) if isinstance(self.labels, list) else self.labels
        isq = torch.cat(self.is_query) if isinstance(self.is_query, list) else self.is_query
        isg = torch.cat(self.is_gallery) if isinstance(self.is_gallery, list) else self.is_gallery
        n = emb.shape[0]
        if n < 2 and bool(isq.all()) and bool(isg.all()):
            raise InvalidInputError(f"embeddings must have at least 2 rows for leave-one-out retrieval, got {n}")
        for name, mask in (("is_query", isq), ("is_gallery", isg)):
            check_mask(mask, n, name)  # each batch was checked in update(); the union must select something
        query_mask = None if bool(isq.all()) else isq
        return _masked(emb, lab, query_mask, None if bool(isg.all()) else isg, emb.device, self.options)


class VerificationMetrics(EmbeddingMetric):
    """Pair verification (ROC-AUC, EER, TAR@FAR, accuracy) over embeddings gathered batch by batch.

    Example:
        >>> import torch
        >>> from headreg.metrics import VerificationMetrics
        >>> metric = VerificationMetrics(far_targets=(0.5,))
        >>> metric.update(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1]))
        >>> out = metric.compute()
        >>> out["roc_auc"], out["eer"], out["num_positive_pairs"], out["num_negative_pairs"]
        (1.0, 0.0, 2, 4)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        far_targets: tuple[float, ...] = DEFAULT_FAR_TARGETS,
        seed: int = 0,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.max_pairs = max_pairs
        self.far_targets = tuple(far_targets)
        self.seed = seed

    def compute(self) -> dict[str, float | int]:
        """Verification metrics over everything added since the last reset (each batch checked in update)."""
        emb, lab = self._stored(min_rows=2)
        i, j, same = sample_pairs(lab, max_pairs=self.max_pairs, seed=self.seed)
        return _verification(emb, i, j, same, emb.device, self.far_targets, False)


class ClusteringMetrics(EmbeddingMetric):
    """NMI / AMI of k-means clusters over embeddings gathered batch by batch.

    Example:
        >>> import torch
        >>> from headreg.metrics import ClusteringMetrics
        >>> metric = ClusteringMetrics()
        >>> metric.update(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1]))
        >>> out = metric.compute()
        >>> round(out["nmi"], 6), round(out["ami"], 6), out["num_clusters"]
        (1.0, 1.0, 2)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, seed: int = 0, max_iter: int = DEFAULT_MAX_ITER, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.max_iter = max_iter

    def compute(self) -> dict[str, float | int]:
        """NMI and AMI over everything added since the last reset."""
        emb, lab = self._stored(min_rows=2)
        return _clustering(emb, lab, None, emb.device, self.seed, self.max_iter, False)


class ClassificationAccuracy(Metric):
    """Top-k accuracy from logits, accumulated as counts (`dist_reduce_fx="sum"`).

    Ties with the k-th logit favour the label (a label counts as within the top k when
    fewer than k logits are strictly larger), which is independent of `torch.topk`'s order.

    Example:
        >>> import torch
        >>> from headreg.metrics import ClassificationAccuracy
        >>> metric = ClassificationAccuracy(top_k=(1, 2))
        >>> metric.update(torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([1, 2]))
        >>> metric.compute()
        {'top1_accuracy': 0.5, 'top2_accuracy': 1.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_k: tuple[int, ...] = (1, 5), **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.top_k = check_positive_ints(top_k, "top_k")
        self.add_state("correct", default=torch.zeros(len(self.top_k), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: `(B, C)` logits and `(B,)` labels."""
        logits, labels = check_logits(logits, labels)
        self.correct += topk_hits(label_rank(logits.detach(), labels), self.top_k).to(self.correct.device)
        self.total += logits.shape[0]

    def compute(self) -> dict[str, float]:
        """Accuracy per k since the last reset (NaN before any update)."""
        total = int(self.total)
        if total == 0:
            return {f"top{k}_accuracy": float("nan") for k in self.top_k}
        return {f"top{k}_accuracy": int(n) / total for k, n in zip(self.top_k, self.correct.tolist(), strict=True)}
