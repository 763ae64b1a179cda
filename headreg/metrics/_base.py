"""What the metric families share: the stored-embeddings ``Metric`` base and a delayed progress bar.

The input checks themselves live in :mod:`headreg._checks` (one module, one wording per fault).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torchmetrics import Metric

from headreg._checks import check_embeddings, check_labels
from headreg.errors import InvalidInputError

__all__ = ["EmbeddingMetric", "stage_bar"]


@contextlib.contextmanager
def stage_bar(desc: str, total: int | None, unit: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar on stderr for one stage of a metric, shown only once the stage has run for 2 s.

    Short work prints nothing; long work (k-means at large k, a million pairs) never looks hung.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, delay=2.0, leave=False, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()


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
