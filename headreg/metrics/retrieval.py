"""k-NN retrieval metrics: precision@1, recall@k, R-precision, MAP@R, k-NN accuracy.

Definitions (exact text in docs/metrics.md) follow pytorch-metric-learning's
`AccuracyCalculator(k="max_bin_count")`: cosine similarity of L2-normalised
embeddings; `R_q` = number of gallery items sharing the query's label (the query
itself excluded); queries with `R_q = 0` are excluded from every average and counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headreg._checks import (
    check_choice,
    check_chunk_size,
    check_embeddings,
    check_labels,
    check_mask,
    check_positive_ints,
    check_same_width,
    resolve_device,
)
from headreg.errors import InvalidInputError
from headreg.metrics._knn import KNN_BACKENDS, iter_ranked_neighbours, iter_self_neighbours
from headreg.metrics._retrieval_sums import RetrievalSums

__all__ = ["positive_warnings", "retrieval_metrics", "retrieval_result", "retrieval_with_masks"]


def _positive_counts(query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """Number of gallery items carrying each query's label, `(Q,)` int64."""
    classes, gallery_counts = torch.unique(gallery_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp(max=classes.numel() - 1)
    return torch.where(classes[pos] == query_labels, gallery_counts[pos], torch.zeros_like(pos))


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    *,
    query_self_index: torch.Tensor | None = None,
    recall_k: tuple[int, ...] = (1, 2, 4, 8),
    knn_k: int = 5,
    r_metrics: bool = True,
    device: str | torch.device | None = None,
    knn_backend: str = "torch",
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    stats: dict[str, float] | None = None,
) -> dict[str, float | int]:
    """Retrieval metrics of query embeddings against a gallery, by cosine similarity.

    Leave-one-out when `gallery` is None: every sample queries all the others.

    Args:
        query: `(Q, D)` float query embeddings (any scale; L2-normalised here).
        query_labels: `(Q,)` integer labels.
        gallery: `(N, D)` float gallery embeddings, or None for leave-one-out.
        gallery_labels: `(N,)` integer labels, required with `gallery`.
        query_self_index: `(Q,)` int64 index of each query inside the gallery (`-1`: not in it);
            that item is never a neighbour and not counted in `R_q`.
        recall_k: the k of each `recall_at_k`.
        knn_k: neighbours voting in `knn_accuracy`.
        r_metrics: compute `r_precision` and `mean_average_precision_at_r` (needs the top `R_q`).
        device: where to compute; None keeps the embeddings' device.
        knn_backend: `"torch"` (exact, chunked) or `"faiss"`.
        chunk_size: queries per similarity chunk; None picks one (512 on a CPU, see `_knn.plan_chunks`).
        seed: seeds the threshold sampling (the result does not depend on it).
        progress: show a tqdm bar over chunks.
        stats: optional dict receiving seconds per stage (`matmul`, `threshold`, `select`, `sort`, `metrics`).

    Returns:
        Flat dict: `precision_at_1`, `recall_at_{k}`, `r_precision`, `mean_average_precision_at_r`,
        `knn_accuracy` (floats in [0, 1], NaN when no query has a positive), `num_queries`,
        `num_gallery`, `num_queries_without_positive`.
    """
    opts = RetrievalOptions(recall_k, knn_k, r_metrics, knn_backend, chunk_size, seed, progress, stats)
    leave_one_out = gallery is None
    min_rows = 2 if leave_one_out else 1
    check_embeddings(query, "query" if not leave_one_out else "embeddings", min_rows=min_rows)
    query_labels = check_labels(query_labels, query.shape[0], "query_labels" if not leave_one_out else "labels")
    if leave_one_out:
        if gallery_labels is not None:
            raise InvalidInputError("gallery_labels was given without gallery; pass both or neither")
    else:
        check_embeddings(gallery, "gallery")
        if gallery_labels is None:
            raise InvalidInputError("gallery_labels is required when gallery is given")
        gallery_labels = check_labels(gallery_labels, gallery.shape[0], "gallery_labels")
        check_same_width(query, gallery)
    if query_self_index is not None:
        if not isinstance(query_self_index, torch.Tensor) or query_self_index.shape != (query.shape[0],):
            got = tuple(query_self_index.shape) if isinstance(query_self_index, torch.Tensor) else query_self_index
            raise InvalidInputError(f"query_self_index must have shape ({query.shape[0]},), got {got}")
    return _retrieval(
        query, query_labels, gallery, gallery_labels, query_self_index, resolve_device(device, query), opts
    )


@dataclass(frozen=True)
class RetrievalOptions:
    """The options of :func:`retrieval_metrics` (see there), checked once when built."""

    recall_k: tuple[int, ...] = (1, 2, 4, 8)
    knn_k: int = 5
    r_metrics: bool = True
    knn_backend: str = "torch"
    chunk_size: int | None = None
    seed: int = 0
    progress: bool = False
    stats: dict[str, float] | None = None

    def __post_init__(self) -> None:
        (knn_k,) = check_positive_ints(self.knn_k, "knn_k")
        checked = {
            "recall_k": check_positive_ints(self.recall_k, "recall_k"),
            "knn_k": knn_k,
            "r_metrics": bool(self.r_metrics),
            "knn_backend": check_choice(self.knn_backend, KNN_BACKENDS, "knn_backend"),
            "chunk_size": check_chunk_size(self.chunk_size),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)


def _retrieval(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None,
    gallery_labels: torch.Tensor | None,
    query_self_index: torch.Tensor | None,
    dev: torch.device,
    opts: RetrievalOptions,
) -> dict[str, float | int]:
    """:func:`retrieval_metrics` on checked input (the unchecked core its callers inside headreg use)."""
    recall_k, knn_k, r_metrics, knn_backend = opts.recall_k, opts.knn_k, opts.r_metrics, opts.knn_backend
    chunk_size, seed, progress, stats = opts.chunk_size, opts.seed, opts.progress, opts.stats
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
        query_self_index = torch.arange(query.shape[0])
    q = F.normalize(query.detach().to(dev, torch.float32), dim=1)
    g = q if leave_one_out else F.normalize(gallery.detach().to(dev, torch.float32), dim=1)
    ql, gl = query_labels.to(dev), gallery_labels.to(dev)
    self_idx = None if query_self_index is None else query_self_index.to(dev).long()

    r = _positive_counts(ql, gl)
    if self_idx is not None:
        # The query's own entry carries its label but is never a neighbour.
        r = r - (self_idx >= 0).long()
    has_pos = r > 0
    kept = has_pos.nonzero().squeeze(1)
    num_without = int((~has_pos).sum())
    n_kept = int(kept.numel())
    k_small = max(max(recall_k), knn_k, 1)
    sums = RetrievalSums(recall_k, knn_k, r_metrics, dev)
    if n_kept:
        qk, rk, lk = q[kept], r[kept], ql[kept]
        sk = None if self_idx is None else self_idx[kept]
        want = torch.clamp(rk, min=k_small) if r_metrics else torch.full_like(rk, k_small)
        if leave_one_out and knn_backend == "torch":
            # Symmetric: each similarity tile serves its rows and its columns (_knn.iter_self_neighbours).
            k_items = torch.zeros_like(r)
            k_items[kept] = want
            chunks = iter_self_neighbours(q, k_items, chunk_size=chunk_size, seed=seed, stats=stats, groups=gl)
            lk, rk = ql, r
        else:
            chunks = (
                (torch.arange(start, start + nbr.shape[0], device=dev), nbr)
                for start, nbr in iter_ranked_neighbours(
                    qk, g, want, sk, chunk_size=chunk_size, backend=knn_backend, seed=seed, stats=stats,
                    gallery_groups=gl,
                )
            )  # fmt: skip
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415 - only when asked for

            chunks = tqdm(chunks, desc="retrieval", unit="chunk")
        t_metrics = 0.0
        for rows, nbr in chunks:
            t0 = time.perf_counter()
            sums.add(nbr, gl, lk[rows], rk[rows])
            t_metrics += time.perf_counter() - t0
        if stats is not None:
            stats["metrics"] = stats.get("metrics", 0.0) + t_metrics
    return retrieval_result(sums.totals(), n_kept, opts, int(q.shape[0]), int(g.shape[0]), num_without)


def retrieval_result(
    sums: torch.Tensor, n_kept: int, opts: RetrievalOptions, num_queries: int, num_gallery: int, num_without: int
) -> dict[str, float | int]:
    """The metrics dict of `retrieval_metrics` from `RetrievalSums.totals()` over every query kept."""
    means = (sums / n_kept).tolist() if n_kept else [float("nan")] * sums.numel()
    out: dict[str, float | int] = {"precision_at_1": means[0]}
    if opts.r_metrics:
        out["r_precision"] = means[1]
        out["mean_average_precision_at_r"] = means[2]
    for i, k in enumerate(opts.recall_k):
        out[f"recall_at_{k}"] = means[3 + i]
    out["knn_accuracy"] = means[-1]
    out["num_queries"] = num_queries
    out["num_gallery"] = num_gallery
    out["num_queries_without_positive"] = num_without
    return out


def positive_warnings(query_labels: torch.Tensor, gallery_labels: torch.Tensor, in_both: torch.Tensor) -> list[str]:
    """Warn about queries with no positive in the gallery; raise when no query has one.

    Args:
        query_labels: `(Q,)` int64 labels of the queries.
        gallery_labels: `(N,)` int64 labels of the gallery.
        in_both: `(Q,)` bool, which queries are also in the gallery (never their own neighbour).

    Raises:
        InvalidInputError: no query has a positive: the retrieval metrics are undefined.
    """
    count = _positive_counts(query_labels, gallery_labels) - in_both.long()
    lonely = int((count <= 0).sum())
    if lonely == query_labels.numel():
        raise InvalidInputError(
            f"no query has another sample of its class in the gallery ({lonely} queries, "
            f"{int(torch.unique(gallery_labels).numel())} gallery classes): retrieval metrics are undefined"
        )
    if not lonely:
        return []
    first = int(query_labels[count <= 0][0])
    return [
        f"{lonely} of {query_labels.numel()} queries have no other sample of their class in the gallery "
        f"(e.g. label {first}); they are left out of the retrieval averages"
    ]


def retrieval_with_masks(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    query_mask: torch.Tensor | None = None,
    gallery_mask: torch.Tensor | None = None,
    **kwargs: object,
) -> dict[str, float | int]:
    """`retrieval_metrics` on one set of embeddings split into queries and gallery by masks.

    Args:
        embeddings: `(N, D)` float embeddings.
        labels: `(N,)` integer labels.
        query_mask: `(N,)` bool, which samples query; None: all.
        gallery_mask: `(N,)` bool, which samples form the gallery; None: all.
        **kwargs: passed on to `retrieval_metrics`.

    Both None is leave-one-out. A sample that is both query and gallery never retrieves itself.
    """
    check_embeddings(embeddings)
    labels = check_labels(labels, embeddings.shape[0])
    n = embeddings.shape[0]
    if query_mask is not None:
        check_mask(query_mask, n, "query_mask")
    if gallery_mask is not None:
        check_mask(gallery_mask, n, "gallery_mask")
    if query_mask is None and gallery_mask is None:
        return retrieval_metrics(embeddings, labels, **kwargs)  # type: ignore[arg-type]
    device = kwargs.pop("device", None)
    opts = RetrievalOptions(**kwargs)  # type: ignore[arg-type]
    return _masked(embeddings, labels, query_mask, gallery_mask, resolve_device(device, embeddings), opts)  # type: ignore[arg-type]


def _masked(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    query_mask: torch.Tensor | None,
    gallery_mask: torch.Tensor | None,
    dev: torch.device,
    opts: RetrievalOptions,
) -> dict[str, float | int]:
    """:func:`retrieval_with_masks` on checked input: split by the masks, then the core."""
    n = embeddings.shape[0]
    if query_mask is None and gallery_mask is None:
        return _retrieval(embeddings, labels, None, None, None, dev, opts)
    qm = torch.ones(n, dtype=torch.bool) if query_mask is None else query_mask.cpu()
    gm = torch.ones(n, dtype=torch.bool) if gallery_mask is None else gallery_mask.cpu()
    q_idx, g_idx = qm.nonzero().squeeze(1), gm.nonzero().squeeze(1)
    position = torch.full((n,), -1, dtype=torch.long)
    position[g_idx] = torch.arange(g_idx.numel())
    d = embeddings.device
    return _retrieval(
        embeddings[q_idx.to(d)],
        labels[q_idx.to(labels.device)],
        embeddings[g_idx.to(d)],
        labels[g_idx.to(labels.device)],
        position[q_idx],
        dev,
        opts,
    )


def per_category(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    query_mask: torch.Tensor | None,
    gallery_mask: torch.Tensor | None,
    categories: list[str],
    dev: torch.device,
    opts: RetrievalOptions,
) -> dict[str, float | int]:
    """Retrieval metrics of each category's queries against the whole gallery, as open-metric-learning defines them.

    OML's ``EmbeddingMetrics(categories_key=...)`` keeps the rows of the query-by-gallery distance matrix whose
    query is in the category, and averages each metric over them: the gallery is not restricted. The same here,
    on checked input (:func:`_masked`'s): keys ``"{category}/{metric}"``, one search per category (together one
    more pass over the queries).

    Args:
        embeddings: `(N, D)`; labels: `(N,)`; query_mask / gallery_mask: `(N,)` bool or None (all).
        categories: `N` category names, one per sample (a query's own category counts).
    """
    n = embeddings.shape[0]
    qm = torch.ones(n, dtype=torch.bool) if query_mask is None else query_mask.cpu()
    gm = torch.ones(n, dtype=torch.bool) if gallery_mask is None else gallery_mask.cpu()
    names = sorted({c for c, q in zip(categories, qm.tolist(), strict=True) if q})
    out: dict[str, float | int] = {}
    for name in names:
        in_cat = torch.tensor([c == name for c in categories], dtype=torch.bool)
        part = _masked(embeddings, labels, (qm & in_cat).to(embeddings.device), gm.to(embeddings.device), dev, opts)
        for key, value in part.items():
            if key != "num_gallery":
                out[f"{name}/{key}"] = value
    return out
