"""Gallery-sharded exact k-NN evaluation (``headreg eval --shard-gallery``): no rank holds the whole gallery.

Every rank keeps the rows it extracted (evaluation loaders shard contiguously, so rank ``r`` holds the global
rows ``[offset_r, offset_r + n_r)``); only the labels (and label ranks), ``O(N)`` integers, are gathered. Then,
chunk by chunk over the queries that have a positive, in the order one process uses:

1. each rank contributes the chunk's queries it holds, and an all-gather gives every rank the chunk
   (``chunk × D`` floats);
2. each rank ranks its own gallery part with the k-NN back end (:class:`~headreg.metrics._knn.GallerySearch`,
   whose layout is built once), keeping each query's ``K_q`` best with the similarities that ranked them;
   leave-one-out skips the query's own row by its global index;
3. the ``W`` candidate lists are all-gathered (``W × chunk × K`` entries) and every rank merges them exactly
   (:func:`~headreg.metrics._knn_merge.merge_ranked`: similarity descending, then global index ascending, the
   tie rule of docs/metrics.md);
4. every rank adds the chunk's per-query terms (:class:`~headreg.metrics._retrieval_sums.RetrievalSums`, whose
   totals do not depend on the chunking), so every rank ends with the same metrics, equal to one process's
   bit for bit.

Memory per rank: its ``N·D/W`` embeddings (and the back end's reordered copy), ``O(N)`` labels, and
``O(chunk × (D + W·K))`` per step. Verification and clustering need every embedding in one place, so they are
refused here with a message; classification needs only the label ranks and is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from headreg._checks import check_choice, nonfinite_error, nonfinite_rows
from headreg.engine.extract import Extraction, extraction_info
from headreg.engine.runtime import all_gather_variable, comm_device, dist_info
from headreg.errors import InvalidValueError
from headreg.metrics._knn import GallerySearch, plan_chunks
from headreg.metrics._knn_merge import merge_ranked
from headreg.metrics._retrieval_sums import RetrievalSums
from headreg.metrics.classification import labels_outside_head, topk_from_ranks
from headreg.metrics.retrieval import RetrievalOptions, _positive_counts, positive_warnings, retrieval_result

__all__ = ["SHARDED_METRICS", "check_sharded_metrics", "evaluate_sharded"]

#: What ``--shard-gallery`` computes: the families that need no more than one rank's embeddings at a time.
SHARDED_METRICS = ("retrieval", "classification")


def check_sharded_metrics(metrics: Sequence[str] | None, knn: str, dataset: Any = None) -> None:
    """Refuse, before any extraction and alike on every rank, what a sharded gallery cannot compute.

    Raises:
        InvalidValueError: verification or clustering named (they need every embedding in one process), a
            k-NN back end other than ``torch`` (faiss orders ties its own way, so its merge would not be exact),
            or a dataset whose protocol is not a plain k-NN search (face pairs, IJB templates, query/gallery
            roles inside one dataset: In-shop, a CSV with ``is_query``). Categories (SOP's) are left out, with a
            warning, by :func:`~headreg.engine.evaluate.evaluate_model`.
    """
    if dataset is not None:
        if getattr(dataset, "issame", None) is not None or getattr(dataset, "protocol", None) == "ijb":
            raise InvalidValueError("--shard-gallery applies to retrieval; a face-pairs dataset has no gallery")
        if any(getattr(dataset, a, None) is not None for a in ("is_query", "is_gallery")):
            raise InvalidValueError(
                "--shard-gallery runs leave-one-out or a separate --gallery dataset; this dataset's own query/gallery "
                "roles need every embedding in one process: drop --shard-gallery"
            )
    bad = [m for m in metrics or () if m not in SHARDED_METRICS]
    if bad:
        raise InvalidValueError(
            f"--shard-gallery computes {' and '.join(SHARDED_METRICS)} only: {', '.join(bad)} need every embedding "
            "in one process; leave them out of --metrics, or drop --shard-gallery (rank 0 then gathers the embeddings)"
        )
    if check_choice(knn, ("torch", "faiss"), "knn") != "torch":
        raise InvalidValueError(f"--shard-gallery merges the exact torch k-NN search only, got --knn {knn}")


def evaluate_sharded(
    parts: list[Extraction],
    *,
    metrics: Sequence[str] | None,
    recall_k: Sequence[int],
    device: torch.device,
    world_size: int,
    num_classes: int = 0,
    progress: bool = False,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Metrics of this rank's extraction shards without gathering their embeddings; the same on every rank.

    Args:
        parts: this rank's :class:`Extraction` of the queries (leave-one-out: of everything), then of the gallery.
        metrics: names from :data:`SHARDED_METRICS`; None: retrieval, plus classification when label ranks exist.
        recall_k: the k of each ``recall_at_k``.
        device: where the search runs.
        world_size: processes in the job.
        num_classes: the head's classes (for the warning about labels outside them), 0 if unknown.
        progress: a progress bar over the query chunks.
        chunk_size: queries per chunk; None: the one-process default (:func:`~headreg.metrics._knn.plan_chunks`).

    Returns:
        The fields of :class:`~headreg.engine.evaluate.EvalResult`: the metrics are global, the tensors are this
        rank's rows only (queries first), and ``info`` says so (``shard_gallery``).
    """
    loo = len(parts) == 1
    with_ranks = all(p.label_rank is not None for p in parts)
    names = tuple(metrics) if metrics is not None else ("retrieval",) + (("classification",) if with_ranks else ())
    check_sharded_metrics(names, "torch")
    if "classification" in names and not with_ranks:
        raise InvalidValueError(
            "metrics 'classification' needs head predictions: evaluate a model with a head, "
            "or leave it out of --metrics"
        )
    qpart, gpart = parts[0], parts[-1]
    _check_finite(parts)
    q_sizes, ql = _sizes(qpart.labels), _gather(qpart.labels)
    g_sizes, gl = (q_sizes, ql) if loo else (_sizes(gpart.labels), _gather(gpart.labels))
    rank = dist_info().rank
    q_off, g_off = sum(q_sizes[:rank]), sum(g_sizes[:rank])
    opts = RetrievalOptions(recall_k=tuple(recall_k))
    nq, ng = int(ql.numel()), int(gl.numel())
    values: dict[str, float | int] = {}
    warnings: list[str] = []
    if "retrieval" in names:
        values["num_samples"] = nq if loo else nq + ng  # as one process's compute_checked reports it
        warnings += positive_warnings(ql, gl, torch.full_like(ql, loo, dtype=torch.bool))
        values.update(_retrieval(qpart.embeddings, ql, gpart.embeddings, gl, q_off, g_off, loo, device, opts,
                                 chunk_size, progress))  # fmt: skip
    if "classification" in names:
        q_ranks = _gather(qpart.label_rank)  # type: ignore[arg-type]
        values.update(topk_from_ranks(q_ranks, (1, 5)))
        warnings += labels_outside_head(torch.cat([ql] if loo else [ql, gl]), num_classes)
    timed = [_timing(p) for p in parts]
    embeddings = torch.cat([p.embeddings for p in parts]).detach().cpu()
    is_query = None if loo else torch.cat([torch.ones(qpart.labels.numel(), dtype=torch.bool),
                                           torch.zeros(gpart.labels.numel(), dtype=torch.bool)])  # fmt: skip
    label_rank = torch.cat([p.label_rank for p in parts]).cpu() if with_ranks else None  # type: ignore[misc]
    info = {
        "protocol": "leave-one-out" if loo else "query/gallery",
        "num_samples": nq if loo else nq + ng,
        "num_queries": nq,
        "num_gallery": ng,
        "embedding_dim": int(qpart.embeddings.shape[1]),
        "shard_gallery": True,
        **extraction_info(timed, device, world_size),
    }
    return {
        "metrics": values,
        "embeddings": embeddings,
        "labels": torch.cat([p.labels for p in parts]).cpu(),
        "is_query": is_query,
        "is_gallery": None if is_query is None else ~is_query,
        "label_rank": label_rank,
        "info": info,
        "warnings": warnings,
    }


def _retrieval(
    q_local: Tensor,
    ql: Tensor,
    g_local: Tensor,
    gl: Tensor,
    q_off: int,
    g_off: int,
    loo: bool,
    dev: torch.device,
    opts: RetrievalOptions,
    chunk_size: int | None,
    progress: bool,
) -> dict[str, float | int]:
    """Steps 1-4 of the module docstring; the dict of :func:`~headreg.metrics.retrieval.retrieval_metrics`."""
    # The search normalises its own reordered copy of the gallery: with the extracted rows, two copies per rank.
    gallery = g_local.detach().to(dev, torch.float32)
    ql, gl = ql.to(dev), gl.to(dev)
    num_query, num_gallery = int(ql.numel()), int(gl.numel())
    r = _positive_counts(ql, gl) - int(loo)  # leave-one-out: the query's own entry is never a neighbour
    kept = (r > 0).nonzero().squeeze(1)
    k_small = max(max(opts.recall_k), opts.knn_k, 1)
    want = torch.clamp(r, min=k_small)
    auto_chunk, tile = plan_chunks(num_gallery, dev)  # sized for the whole gallery, as one process does
    chunk = chunk_size or auto_chunk
    groups = gl[g_off : g_off + gallery.shape[0]]  # this rank's gallery rows
    search = GallerySearch(gallery, chunk_size=chunk, tile_size=tile, seed=opts.seed, groups=groups, normalize=True)
    qn = None if loo else F.normalize(q_local.detach().to(dev, torch.float32), dim=1)
    sums = RetrievalSums(opts.recall_k, opts.knn_k, opts.r_metrics, dev)
    starts = range(0, int(kept.numel()), chunk)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415 - only when asked for

        starts = tqdm(starts, desc="retrieval (sharded)", unit="chunk")
    q_hi, g_hi = q_off + q_local.shape[0], g_off + gallery.shape[0]
    for start in starts:
        rows = kept[start : start + chunk]
        mine = rows[(rows >= q_off) & (rows < q_hi)] - q_off
        q = _gather(search.rows(mine) if qn is None else qn[mine])  # in global order: ranks hold ascending slices
        own = None
        if loo:  # the query's own row, when this rank holds it
            own = torch.where((rows >= g_off) & (rows < g_hi), rows - g_off, torch.full_like(rows, -1))
        k = want[rows]
        nbr, sim = search.search(q, k, own)
        width = int(k.max())
        idx = torch.full((rows.numel(), width), -1, dtype=torch.long, device=dev)
        val = torch.full((rows.numel(), width), float("-inf"), dtype=sim.dtype, device=dev)
        idx[:, : nbr.shape[1]] = torch.where(nbr >= 0, nbr + g_off, nbr)
        val[:, : sim.shape[1]] = sim
        merged = merge_ranked(_split(_gather(idx)), _split(_gather(val)), torch.clamp(k, max=num_gallery - int(loo)))
        sums.add(merged, gl, ql[rows], r[rows])
    return retrieval_result(
        sums.totals(), int(kept.numel()), opts, num_query, num_gallery, int(num_query - kept.numel())
    )


def _split(stacked: Tensor) -> list[Tensor]:
    """``(W·rows, L)`` (every rank's ``(rows, L)``, gathered) → ``W`` tensors ``(rows, L)``."""
    return list(stacked.chunk(max(1, dist_info().world_size), dim=0))


def _gather(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated in rank order on the first dimension, on ``t``'s device."""
    if not dist_info().is_distributed:
        return t
    return all_gather_variable(t.to(comm_device())).to(t.device)


def _sizes(labels: Tensor) -> list[int]:
    """Rows of every rank, in rank order."""
    return _gather(torch.tensor([labels.numel()], dtype=torch.long, device=labels.device)).tolist()


def _check_finite(parts: list[Extraction]) -> None:
    """The NaN / Inf scan of each rank's rows, its verdict shared, so every rank raises the same error.

    Rows are numbered as one process numbers them: queries first, then the gallery.
    """
    total, count, first = 0, 0, -1
    for part in parts:
        sizes = _sizes(part.labels)
        bad = nonfinite_rows(part.embeddings).cpu()
        local = int(bad[0]) + total + sum(sizes[: dist_info().rank]) if bad.numel() else -1
        found = _gather(torch.tensor([[bad.numel(), local]], dtype=torch.long))
        count += int(found[:, 0].sum())
        if first < 0 and count:
            first = int(found[:, 1][found[:, 1] >= 0].min())
        total += sum(sizes)
    if count:
        raise nonfinite_error("embeddings", count, total, first)


def _timing(part: Extraction) -> Extraction:
    """``part`` with the job's extraction time (the slowest rank) and image count (the sum), as a gather gives."""
    if not dist_info().is_distributed:
        return part
    stats = _gather(torch.tensor([[part.seconds, float(part.images)]], dtype=torch.float64))
    return replace(part, seconds=float(stats[:, 0].max()), images=int(stats[:, 1].sum()))
