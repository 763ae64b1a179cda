"""Files of precomputed embeddings and labels, in safetensors (no pickle, safe to load from anyone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from headreg._checks import check_embeddings, check_labels, check_mask
from headreg.errors import DatasetNotFoundError, InvalidInputError, InvalidValueError

__all__ = ["load_embeddings", "save_embeddings"]

_MASKS = ("is_query", "is_gallery")


def _check(embeddings: Any, labels: Any, masks: dict[str, Any], where: str) -> None:
    """Structure only (shapes, dtypes); the NaN / Inf scan is the evaluation's, done once there."""
    check_embeddings(embeddings, f"{where}embeddings", finite=False)
    n = embeddings.shape[0]
    check_labels(labels, n, f"{where}labels")
    for key, mask in masks.items():
        check_mask(mask, n, f"{where}{key}", nonempty=False)


def save_embeddings(
    path: str | Path,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    is_query: torch.Tensor | None = None,
    is_gallery: torch.Tensor | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write embeddings and labels to a safetensors file, creating parent folders.

    Args:
        path: Output file (``.safetensors`` by convention).
        embeddings: ``(N, D)`` float, any device (copied to CPU; dtype kept).
        labels: ``(N,)`` integer class labels (stored as int64).
        is_query: Optional ``(N,)`` bool mask of query samples, for retrieval splits.
        is_gallery: Optional ``(N,)`` bool mask of gallery samples.
        metadata: Optional string-to-string pairs stored in the header (e.g. model, head, dataset).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    masks = {k: v for k, v in (("is_query", is_query), ("is_gallery", is_gallery)) if v is not None}
    _check(embeddings, labels, masks, "")
    if metadata is not None:
        pairs = metadata.items() if isinstance(metadata, dict) else [(None, None)]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs):
            raise InvalidValueError(
                f"metadata must map strings to strings (safetensors headers hold text), got {metadata!r}"
            )
    tensors = {
        "embeddings": embeddings.detach().to("cpu").contiguous(),
        "labels": labels.detach().to("cpu", torch.long).contiguous(),
        **{k: v.detach().to("cpu").contiguous() for k, v in masks.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)
    return path


def read_tensors(
    path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = (), *, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The named tensors and the metadata of a safetensors file; other tensors in it are not read.

    Args:
        path: The file.
        required: Keys that must be there.
        optional: Keys read when there.
        what: The kind of file, for the messages (``"embeddings file"``).

    Raises:
        DatasetNotFoundError: no file at ``path``.
        InvalidInputError: not a safetensors file, or a required key missing.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            metadata = dict(f.metadata() or {})
            missing = [k for k in required if k not in keys]
            if missing:
                lacks = ", ".join(repr(k) for k in missing)
                raise InvalidInputError(f"{what} {path} lacks {lacks}; it holds {sorted(keys) or 'no tensors'}")
            tensors = {k: f.get_tensor(k) for k in (*required, *optional) if k in keys}
    except InvalidInputError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError or OSError for a bad header
        raise InvalidInputError(f"{path} is not a readable safetensors file: {type(err).__name__}: {err}") from None
    return tensors, metadata


def load_embeddings(path: str | Path) -> dict[str, Any]:
    """Read and validate a file written by :func:`save_embeddings`.

    Args:
        path: The safetensors file.

    Returns:
        ``{"embeddings": (N, D) float, "labels": (N,) int64, "metadata": dict[str, str]}`` plus ``"is_query"`` /
        ``"is_gallery"`` ``(N,)`` bool when the file holds them. Other tensors in the file are ignored.

    Raises:
        DatasetNotFoundError: no file at ``path``.
        InvalidInputError: not a safetensors file, a required key missing, or shapes/dtypes that disagree.
    """
    out, metadata = read_tensors(path, ("embeddings", "labels"), _MASKS, what="embeddings file")
    masks = {k: out[k] for k in _MASKS if k in out}
    _check(out["embeddings"], out["labels"], masks, f"in {Path(path)}: ")
    out["labels"] = out["labels"].to(torch.long)
    out["metadata"] = metadata
    return out
