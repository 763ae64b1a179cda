"""Input checks shared by the metrics: a user mistake becomes one clear headreg error.

Every check names the argument, the value received and what was expected, so a bad
call never surfaces as a traceback from deep inside torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torchmetrics import Metric

from headreg.errors import InvalidInputError, InvalidValueError

__all__ = ["check_embeddings", "check_labels", "check_mask", "resolve_device", "stage_bar"]


def check_embeddings(x: object, name: str = "embeddings", *, min_rows: int = 1) -> torch.Tensor:
    """Check a `(N, D)` floating tensor of finite values with at least `min_rows` rows.

    Returns the tensor unchanged (never a copy the caller could mistake for its own).
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.ndim != 2:
        raise InvalidInputError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InvalidInputError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise InvalidInputError(f"{name} must have at least one feature column, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise InvalidInputError(f"{name} must have at least {min_rows} rows, got {x.shape[0]}")
    finite_rows = torch.isfinite(x).all(dim=1)
    if not bool(finite_rows.all()):
        bad = int((~finite_rows).sum())
        first = int((~finite_rows).nonzero()[0, 0])
        raise InvalidInputError(
            f"{name} must be finite, got {bad} row(s) with NaN or Inf out of {x.shape[0]} (first at row {first})"
        )
    return x


def check_labels(y: object, n: int, name: str = "labels") -> torch.Tensor:
    """Check a `(N,)` integer label tensor with `n` entries; returns it as int64."""
    if not isinstance(y, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor of shape ({n},), got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != n:
        raise InvalidInputError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InvalidInputError(f"{name} must be an integer tensor, got dtype {y.dtype}")
    return y.long()


def check_mask(m: object, n: int, name: str) -> torch.Tensor:
    """Check a `(N,)` boolean mask with `n` entries and at least one True."""
    if not isinstance(m, torch.Tensor):
        raise InvalidInputError(f"{name} must be a boolean torch.Tensor of shape ({n},), got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise InvalidInputError(f"{name} must have dtype torch.bool, got {m.dtype}")
    if m.ndim != 1 or m.shape[0] != n:
        raise InvalidInputError(f"{name} must have shape ({n},), got {tuple(m.shape)}")
    if not bool(m.any()):
        raise InvalidInputError(f"{name} must select at least one sample, got all False")
    return m


def resolve_device(device: str | torch.device | None, like: torch.Tensor) -> torch.device:
    """`None` keeps the tensor's own device; anything else must parse as a torch device."""
    if device is None:
        return like.device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc


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


def check_positive_ints(values: object, name: str) -> tuple[int, ...]:
    """Check a non-empty sequence of positive ints (e.g. `recall_k`)."""
    if isinstance(values, int):
        values = (values,)
    try:
        out = tuple(int(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"{name} must be a sequence of positive integers, got {values!r}") from exc
    if not out or any(v < 1 for v in out):
        raise InvalidValueError(f"{name} must be a non-empty sequence of positive integers, got {values!r}")
    return out


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

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything added since the last reset, ``(N, D)`` and ``(N,)``."""
        if not self.embeddings:
            raise InvalidInputError(f"{type(self).__name__}.compute() called before any update()")
        emb = torch.cat(self.embeddings) if isinstance(self.embeddings, list) else self.embeddings
        lab = torch.cat(self.labels) if isinstance(self.labels, list) else self.labels
        return emb, lab
