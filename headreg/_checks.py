"""headreg's input checks, in one place, with one wording per fault.

Public entry points check once: the API functions (``compute_metrics``, ``retrieval_metrics``,
``evaluate_embeddings``, ``plot_embeddings``, ...), every ``Metric.update`` and the CLI. What they
call inside headreg trusts its caller and checks nothing again (the unchecked cores, as
torchmetrics' ``_update`` / ``_compute``), so one ``headreg eval`` scans the embeddings for NaN
and Inf once (:func:`check_finite`; ``tests/test_checks.py`` counts it).

Each message names the argument, the value received and what was expected, so a user mistake
never surfaces as a traceback from deep inside torch. Depends on torch and :mod:`headreg.errors`
only, so every layer can use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from headreg.errors import InvalidInputError, InvalidValueError, did_you_mean

__all__ = [
    "check_chunk_size",
    "check_choice",
    "check_embeddings",
    "check_finite",
    "check_labels",
    "check_logits",
    "check_mask",
    "check_positive_ints",
    "check_same_width",
    "nonfinite_error",
    "nonfinite_rows",
    "resolve_device",
]


#: Entries per block of the NaN / Inf scan.
_SCAN_ELEMENTS = 1 << 22


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def check_embeddings(x: object, name: str = "embeddings", *, min_rows: int = 1, finite: bool = True) -> Tensor:
    """Check a ``(N, D)`` floating tensor with at least ``min_rows`` rows (and, by default, finite values).

    Args:
        x: the tensor.
        name: the argument's name, for messages.
        min_rows: fewest rows accepted.
        finite: also scan for NaN / Inf (:func:`check_finite`). A structural check of a file
            being loaded passes False: the evaluation that follows scans once.

    Returns:
        The tensor unchanged (never a copy the caller could mistake for its own).
    """
    if not isinstance(x, Tensor):
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
    return check_finite(x, name) if finite else x


def check_finite(x: Tensor, name: str = "embeddings") -> Tensor:
    """The one NaN / Inf scan of a ``(N, D)`` tensor; raises naming how many rows and the first."""
    bad = nonfinite_rows(x)
    if bad.numel():
        raise nonfinite_error(name, bad.numel(), x.shape[0], int(bad[0]))
    return x


def nonfinite_rows(x: Tensor) -> Tensor:
    """Indices of the rows of a ``(N, D)`` tensor holding a NaN or an Inf, ``(n_bad,)`` int64.

    Scanned in row blocks: ``torch.isfinite`` on the whole tensor makes temporaries several times its
    size (850 MiB for 1M × 128 float32), a block's stay small.
    """
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    rows = max(1, _SCAN_ELEMENTS // max(1, x.shape[1]))
    finite_rows = torch.cat([torch.isfinite(x[s : s + rows]).all(dim=1) for s in range(0, x.shape[0], rows)])
    return (~finite_rows).nonzero().flatten()


def nonfinite_error(name: str, count: int, total: int, first: int) -> InvalidInputError:
    """The error of :func:`check_finite`: ``count`` of ``total`` rows are not finite, the first at row ``first``."""
    return InvalidInputError(
        f"{name} must be finite, got {count} of {total} rows with NaN or Inf "
        f"(first at row {first}); from a model, that is a diverged checkpoint or low-precision "
        "overflow (try --no-amp)"
    )


def check_labels(y: object, n: int, name: str = "labels") -> Tensor:
    """Check a ``(N,)`` integer label tensor with ``n`` entries; returns it as int64."""
    if not isinstance(y, Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor of shape ({n},), got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != n:
        raise InvalidInputError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InvalidInputError(f"{name} must be an integer tensor, got dtype {y.dtype}")
    return y.long()


def check_mask(m: object, n: int, name: str, *, nonempty: bool = True) -> Tensor:
    """Check a ``(N,)`` boolean mask with ``n`` entries and (by default) at least one True."""
    if not isinstance(m, Tensor) or m.dtype != torch.bool or m.ndim != 1 or m.shape[0] != n:
        got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, Tensor) else type(m).__name__
        raise InvalidInputError(f"{name} must be a bool tensor of shape ({n},), got {got}")
    if nonempty and not bool(m.any()):
        raise InvalidInputError(f"{name} selects no sample (all {n} entries are False)")
    return m


def check_same_width(query: Tensor, gallery: Tensor, what: str = "gallery") -> None:
    """Query and gallery embeddings must share their width ``D``."""
    if gallery.shape[1] != query.shape[1]:
        raise InvalidInputError(
            f"{what} must have the query width D={query.shape[1]}, got shape {tuple(gallery.shape)}"
        )


def check_positive_ints(values: object, name: str) -> tuple[int, ...]:
    """Check a non-empty sequence of positive ints (``recall_k``); a lone int is a sequence of one."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    try:
        out = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        out = ()
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise InvalidValueError(
            f"{name} must be a non-empty sequence of positive integers, e.g. 1,2,4,8, got {values!r}"
        )
    return out


def check_chunk_size(chunk_size: object) -> int | None:
    """``None`` or a positive int (queries per similarity chunk)."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def check_logits(logits: object, labels: object) -> tuple[Tensor, Tensor]:
    """Check ``(B, C)`` finite float logits and ``(B,)`` integer labels in ``[0, C)``; labels as int64."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise InvalidInputError(f"logits must be a non-empty tensor of shape (B, C), got {_shape(logits)}")
    if not logits.is_floating_point():
        raise InvalidInputError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    b, c = logits.shape
    labels = check_labels(labels, b)
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise InvalidInputError(
            f"labels must lie in [0, {c}) for {c} classes, got [{int(labels.min())}, {int(labels.max())}]"
        )
    check_finite(logits, "logits")
    return logits, labels


def check_choice(value: object, choices: Iterable[str], name: str) -> str:
    """``value`` must be one of ``choices``; an unknown name suggests the closest."""
    options = tuple(choices)
    if value not in options:
        hint = did_you_mean(str(value), options) if isinstance(value, str) else ""
        raise InvalidValueError(f"{name} must be one of {', '.join(options)}, got {value!r}{hint}")
    return str(value)


def resolve_device(device: str | torch.device | None, like: Tensor) -> torch.device:
    """``None`` keeps the tensor's own device; anything else must parse as a torch device."""
    if device is None:
        return like.device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
