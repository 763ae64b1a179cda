"""What a dataset says about its own evaluation: query/gallery roles, categories, the k of Recall@K.

The retrieval benchmarks (:class:`~headreg.data.ImageListDataset`: In-shop's query and gallery images, a CSV's
``is_query`` / ``is_gallery`` and ``category`` columns, SOP's super-classes) carry these as attributes; any other
dataset carries none and is evaluated leave-one-out with the caller's defaults. Read here, once, for
:func:`headreg.engine.evaluate.evaluate_model` and for training's per-epoch test pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_RECALL_K", "dataset_recall_k", "dataset_roles"]

#: Recall@K's k when neither the caller nor the dataset names them (CUB and Cars report these).
DEFAULT_RECALL_K = (1, 2, 4, 8)


def dataset_recall_k(dataset: Any, recall_k: Any = None) -> tuple[int, ...]:
    """``recall_k`` if given, else the dataset's own (SOP: 1, 10, 100, 1000; In-shop: 1, 10, ..., 50), else 1,2,4,8."""
    if recall_k is not None:
        return tuple(recall_k)
    return tuple(getattr(dataset, "recall_k", None) or DEFAULT_RECALL_K)


def dataset_roles(dataset: Any, indices: Tensor | None) -> tuple[Tensor | None, Tensor | None, list[str] | None]:
    """The ``(is_query, is_gallery, categories)`` of the extracted rows (``indices`` into the dataset, or all).

    Masks are None when the dataset has no roles (leave-one-out); categories None when it has none.
    """
    is_query, is_gallery = getattr(dataset, "is_query", None), getattr(dataset, "is_gallery", None)
    categories = getattr(dataset, "categories", None)
    if indices is None:
        indices = torch.arange(len(dataset))
    idx = indices.cpu().long()
    if is_query is not None or is_gallery is not None:
        n = len(dataset)
        is_query = (torch.ones(n, dtype=torch.bool) if is_query is None else is_query)[idx]
        is_gallery = (torch.ones(n, dtype=torch.bool) if is_gallery is None else is_gallery)[idx]
    if categories is not None:
        categories = [categories[i] for i in idx.tolist()]
    return is_query, is_gallery, categories
