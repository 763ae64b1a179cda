"""Embedding scatter plots: 2-D embeddings as they are, wider ones projected to 2-D by PCA, coloured by class.

Used by ``headreg eval --plot`` and ``headreg compare`` (one panel per head). matplotlib is imported inside the
functions with the non-interactive Agg backend, so nothing here needs a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from headreg._checks import check_embeddings, check_labels

__all__ = ["plot_embeddings", "project_2d", "save_embedding_plot"]

#: Points drawn at most per panel: beyond this a scatter plot is ink, not information.
MAX_POINTS = 20_000


def project_2d(embeddings: Tensor, normalize: bool = False) -> tuple[Tensor, str]:
    """Map ``(N, D)`` embeddings to ``(N, 2)`` for drawing.

    Args:
        embeddings: ``(N, D)`` float, any device.
        normalize: L2-normalise the rows first (what cosine heads compare; points land on a circle when D = 2).

    Returns:
        ``((N, 2) float32 CPU points, axis description)``: the embeddings themselves when ``D == 2`` (``D == 1``
        is drawn against zero), else their projection on the first two principal components.
    """
    x = embeddings.detach().to("cpu", torch.float32)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    d = x.shape[1]
    if d == 1:
        return torch.cat([x, torch.zeros_like(x)], dim=1), "embedding"
    if d == 2:
        return x, "embedding"
    centred = x - x.mean(dim=0, keepdim=True)
    # Right singular vectors of the centred data are the principal axes; float64 keeps tiny spreads stable.
    _, s, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    var = s.square()
    share = (var[:2].sum() / var.sum().clamp_min(1e-30)).item()
    return (centred.double() @ vh[:2].T).float(), f"PCA of {d}-D ({share:.0%} of variance)"


def _check(embeddings: Any, labels: Any) -> tuple[Tensor, Tensor]:
    embeddings = check_embeddings(embeddings, "embeddings to plot")
    return embeddings, check_labels(labels, embeddings.shape[0], "labels to plot").detach().cpu()


def plot_embeddings(
    ax: Any,
    embeddings: Tensor,
    labels: Tensor,
    title: str | None = None,
    normalize: bool = False,
    max_points: int = MAX_POINTS,
    seed: int = 0,
) -> Any:
    """Draw one scatter panel of embeddings coloured by class on a matplotlib ``Axes``.

    Args:
        ax: A matplotlib ``Axes``.
        embeddings: ``(N, D)`` float embeddings.
        labels: ``(N,)`` class labels (colours; a legend when there are at most 20 classes).
        title: Panel title.
        normalize: L2-normalise before projecting.
        max_points: Draw a seeded random subset of at most this many points.
        seed: Seed of that subset.

    Returns:
        ``ax``.
    """
    embeddings, labels = _check(embeddings, labels)
    return _draw(ax, embeddings, labels, title, normalize, max_points, seed)


def _draw(
    ax: Any, embeddings: Tensor, labels: Tensor, title: str | None, normalize: bool, max_points: int, seed: int
) -> Any:
    """:func:`plot_embeddings` on checked input (CPU labels)."""
    if embeddings.shape[0] > max_points:
        keep = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        embeddings, labels = embeddings[keep.to(embeddings.device)], labels[keep]
    points, axis = project_2d(embeddings, normalize=normalize)
    classes = torch.unique(labels).tolist()
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo")
    size = max(1.0, min(12.0, 4000.0 / max(points.shape[0], 1)))
    for i, c in enumerate(classes):
        sel = labels == c
        colour = cmap(i % cmap.N if len(classes) <= 20 else i / max(len(classes) - 1, 1))
        ax.scatter(points[sel, 0], points[sel, 1], s=size, color=colour, label=str(c), alpha=0.7, linewidths=0)
    if len(classes) <= 20:
        ax.legend(markerscale=max(1.0, 6.0 / size), fontsize="small", loc="best", frameon=False)
    ax.set_xlabel(f"{axis} 1" if axis != "embedding" else "dim 1")
    ax.set_ylabel(f"{axis} 2" if axis != "embedding" else "dim 2")
    if axis == "embedding" or normalize:
        ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title)
    return ax


def save_embedding_plot(path: str | Path, embeddings: Tensor, labels: Tensor, title: str | None = None) -> Path:
    """Write one scatter plot of ``embeddings`` coloured by ``labels`` to ``path`` (format from its suffix).

    Returns:
        The path written (parent folders are created).
    """
    embeddings, labels = _check(embeddings, labels)
    return _save_plot(path, embeddings, labels, title)


def _save_plot(path: str | Path, embeddings: Tensor, labels: Tensor, title: str | None = None) -> Path:
    """:func:`save_embedding_plot` on checked input (what ``headreg eval --plot`` calls after its checks)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    try:
        _draw(ax, embeddings, labels.detach().cpu(), title, False, MAX_POINTS, 0)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
