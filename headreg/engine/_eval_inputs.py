"""The inputs of an evaluation: embeddings and labels checked, query and gallery stacked, head top-k from ranks.

Re-exported by :mod:`headreg.engine.evaluate`, where callers of the engine API import them from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from headreg._checks import check_embeddings, check_labels, check_same_width
from headreg.metrics.classification import topk_from_ranks

__all__ = ["classification_accuracy", "combine_query_gallery", "validate_embeddings"]


def validate_embeddings(embeddings: Any, labels: Any, *, what: str = "embeddings") -> tuple[Tensor, Tensor]:
    """Check ``(N, D)`` finite float embeddings and ``(N,)`` integer labels; return them (labels as int64).

    The checks of :mod:`headreg._checks`, kept under this name for callers of the engine API.

    Raises:
        InvalidInputError: with the argument, the value received and what was expected.
    """
    embeddings = check_embeddings(embeddings, what)
    return embeddings, check_labels(labels, embeddings.shape[0], f"labels of {what}")


def combine_query_gallery(
    query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack query rows then gallery rows; return ``(embeddings, labels, is_query, is_gallery)``.

    Checks shapes and dtypes only: the evaluation of the result scans it for NaN / Inf, once.

    Raises:
        InvalidInputError: the two sets have different widths, or bad shapes.
    """
    check_embeddings(query, "query embeddings", finite=False)
    query_labels = check_labels(query_labels, query.shape[0], "labels of query embeddings")
    check_embeddings(gallery, "gallery embeddings", finite=False)
    gallery_labels = check_labels(gallery_labels, gallery.shape[0], "labels of gallery embeddings")
    check_same_width(query, gallery, "gallery embeddings")
    nq, ng = query.shape[0], gallery.shape[0]
    device = query.device
    is_query = torch.cat([torch.ones(nq, dtype=torch.bool), torch.zeros(ng, dtype=torch.bool)]).to(device)
    embeddings = torch.cat([query, gallery.to(device, query.dtype)])
    labels = torch.cat([query_labels, gallery_labels.to(query_labels.device)])
    return embeddings, labels, is_query, ~is_query


def classification_accuracy(label_rank: Tensor, top_k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of the head from each sample's label rank.

    The one definition of :func:`headreg.metrics.classification.label_rank` (a hit when fewer than k classes
    score strictly above the label), from ranks instead of ``N x C`` logits.

    Args:
        label_rank: ``(N,)`` int64 classes scored strictly above each label (see :class:`Extraction`).
        top_k: The k values.

    Returns:
        ``{"top1_accuracy": ..., "top5_accuracy": ...}`` (one key per k).
    """
    return topk_from_ranks(label_rank, tuple(top_k))
