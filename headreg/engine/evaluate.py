"""The evaluation pipeline behind ``headreg eval`` and the end of ``headreg train``: model + data → metrics.

Two protocols:

* **leave-one-out** on one split: every sample queries all the others;
* **query/gallery**: the samples of one split (or file) query those of another; rows are stored query first,
  then gallery, with boolean ``is_query`` / ``is_gallery`` masks (the layout of an embeddings file).

Under ``torchrun`` every rank extracts its shard, the shards are gathered in rank order, rank 0 computes the
metrics and broadcasts them (errors included, so no rank waits forever), and every rank returns the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from headreg._checks import (
    check_choice,
    check_mask,
    resolve_device,
)
from headreg.engine._eval_inputs import classification_accuracy, combine_query_gallery, validate_embeddings
from headreg.engine._jsonsafe import json_safe
from headreg.engine._roles import dataset_recall_k, dataset_roles
from headreg.engine.extract import Extraction, extract_dataset, extraction_info, gather_extraction
from headreg.errors import InvalidInputError, InvalidValueError
from headreg.metrics._knn import KNN_BACKENDS
from headreg.metrics.classification import labels_outside_head
from headreg.metrics.retrieval import RetrievalOptions, positive_warnings

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "EvalResult",
    "KNN_BACKENDS",
    "broadcast_from_main",
    "classification_accuracy",
    "combine_query_gallery",
    "evaluate_embeddings",
    "evaluate_model",
    "parse_metric_names",
    "validate_embeddings",
]

ALL_METRICS = ("retrieval", "verification", "clustering", "classification")
#: Computed when the caller names none; classification is added when head predictions exist.
DEFAULT_METRICS = ("retrieval", "verification", "clustering")


@dataclass
class EvalResult:
    """The outcome of one evaluation.

    Attributes:
        metrics: Flat ``name -> value`` dict (floats in [0, 1] for rates, ints for counts; NaN where undefined).
        embeddings: ``(N, D)`` float32 on the CPU (query rows first under query/gallery).
        labels: ``(N,)`` int64.
        is_query: ``(N,)`` bool, or None for leave-one-out.
        is_gallery: ``(N,)`` bool, or None for leave-one-out.
        label_rank: ``(N,)`` int64 rank of each label under the head's logits, or None.
        info: Where the numbers came from: protocol, sizes, device, precision, images/s, world size.
        warnings: Conditions worth telling the user that did not stop the evaluation.
        issame: ``(P,)`` bool under the pairs protocol (``N = 2P`` interleaved rows), else None.
    """

    metrics: dict[str, float | int]
    embeddings: Tensor
    labels: Tensor
    is_query: Tensor | None = None
    is_gallery: Tensor | None = None
    label_rank: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    issame: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"metrics", "info", "warnings"}``; NaN and infinities become None."""
        return {"metrics": json_safe(self.metrics), "info": json_safe(self.info), "warnings": list(self.warnings)}


def parse_metric_names(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"retrieval,clustering"`` → ``("retrieval", "clustering")``; None stays None (the defaults)."""
    if spec is None:
        return None
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [s for s in names if s]
    bad = [s for s in names if s not in ALL_METRICS]
    if bad or not names:
        raise InvalidValueError(f"metrics must be a comma-separated subset of {','.join(ALL_METRICS)}, got {spec!r}")
    return tuple(dict.fromkeys(names))


def evaluate_embeddings(
    embeddings: Tensor,
    labels: Tensor,
    *,
    is_query: Tensor | None = None,
    is_gallery: Tensor | None = None,
    label_rank: Tensor | None = None,
    metrics: Sequence[str] | str | None = None,
    recall_k: Sequence[int] = (1, 2, 4, 8),
    knn: str = "torch",
    device: torch.device | str | None = None,
    progress: bool = False,
    categories: Sequence[str] | None = None,
) -> tuple[dict[str, float | int], list[str]]:
    """Metrics of a set of embeddings (single process; :func:`evaluate_model` handles ranks).

    Args:
        embeddings: ``(N, D)`` float embeddings (normalised inside the metrics).
        labels: ``(N,)`` integer labels.
        is_query: ``(N,)`` bool, which rows query; None with ``is_gallery`` None is leave-one-out.
        is_gallery: ``(N,)`` bool, which rows form the gallery.
        label_rank: ``(N,)`` rank of each label under the head's logits, for ``classification`` (computed on the
            query rows).
        metrics: Names from :data:`ALL_METRICS`; None: :data:`DEFAULT_METRICS` plus classification when
            ``label_rank`` is given.
        recall_k: The k of each ``recall_at_k``.
        knn: ``"torch"`` (exact, chunked) or ``"faiss"``.
        device: Where to compute; None keeps the embeddings' device.
        progress: A progress bar over the retrieval chunks.
        categories: ``N`` category names: retrieval metrics also per category of the queries, keys
            ``"{category}/{metric}"`` (:func:`headreg.metrics.retrieval.per_category`).

    Returns:
        ``(metrics, warnings)``.

    Raises:
        InvalidInputError: non-finite embeddings, non-integer labels, fewer than 2 samples, empty masks.
        InvalidValueError: unknown metric names, classification without predictions, a bad ``knn``.
    """
    # The checks of this evaluation, all here: nothing below scans the embeddings again.
    names = parse_metric_names(metrics)
    if names is None:
        names = DEFAULT_METRICS + (("classification",) if label_rank is not None else ())
    options = RetrievalOptions(
        recall_k=tuple(recall_k), knn_backend=check_choice(knn, KNN_BACKENDS, "knn"), progress=progress
    )
    embeddings, labels = validate_embeddings(embeddings, labels)
    n = embeddings.shape[0]
    for key, mask in (("is_query", is_query), ("is_gallery", is_gallery)):
        if mask is not None:
            check_mask(mask, n, key)
    loo = is_query is None and is_gallery is None
    if loo and n < 2:
        raise InvalidInputError(f"leave-one-out evaluation needs at least 2 samples, got {n}")
    if "classification" in names and label_rank is None:
        raise InvalidValueError(
            "metrics 'classification' needs head predictions: evaluate a model with a head (not an embeddings file "
            "or a head-less model), or leave it out of --metrics"
        )
    if categories is not None and len(categories) != n:
        raise InvalidInputError(f"categories must name one category per row ({n}), got {len(categories)}")
    if label_rank is not None and label_rank.shape != (n,):
        raise InvalidInputError(f"label_rank must have shape ({n},), got {tuple(label_rank.shape)}")
    dev = resolve_device(device, embeddings)
    qm = torch.ones(n, dtype=torch.bool) if is_query is None else is_query.cpu()
    gm = torch.ones(n, dtype=torch.bool) if is_gallery is None else is_gallery.cpu()
    lab = labels.cpu()
    # A sample in both is never its own neighbour.
    warnings: list[str] = positive_warnings(lab[qm], lab[gm], (qm & gm)[qm])
    if "verification" in names and int(torch.unique(lab).numel()) < 2:
        names = tuple(m for m in names if m != "verification")
        warnings.append("all samples carry one label, so there are no impostor pairs: verification is skipped")
    out: dict[str, float | int] = {}
    embedding_names = tuple(m for m in names if m != "classification")
    if embedding_names:
        from headreg.metrics._compute import compute_checked

        query_mask = None if loo else qm.to(embeddings.device)
        gallery_mask = None if loo else gm.to(embeddings.device)
        out.update(compute_checked(embeddings, labels, query_mask, gallery_mask, embedding_names, options, dev))
        if categories is not None and "retrieval" in names:
            from headreg.metrics.retrieval import per_category

            out.update(per_category(embeddings, labels, query_mask, gallery_mask, list(categories), dev, options))
    if "classification" in names and label_rank is not None:
        out.update(classification_accuracy(label_rank[qm.to(label_rank.device)]))
    return out, warnings


def broadcast_from_main(fn: Any) -> Any:
    """Run ``fn`` on rank 0 and hand its result, or its headreg error, to every rank (see ``run_on_main``)."""
    from headreg.engine.runtime import run_on_main

    return run_on_main(fn)


def evaluate_model(
    model: nn.Module,
    query: Any,
    gallery: Any | None = None,
    *,
    device: torch.device | str = "auto",
    batch_size: int = 256,
    workers: int | None = None,
    limit: int | None = None,
    input_size: int | tuple[int, ...] | None = None,
    amp: bool | None = None,
    metrics: Sequence[str] | str | None = None,
    recall_k: Sequence[int] | None = None,
    knn: str = "torch",
    tta: str | None = None,
    detector_score: bool = True,
    progress: bool | None = None,
    shard_gallery: bool = False,
) -> EvalResult:
    """Extract embeddings of ``query`` (and ``gallery``) with ``model`` and compute the metrics.

    Args:
        model: A :class:`~headreg.HeadModel` (or a timm model); its data config gives the transform.
        query: A dataset from :func:`headreg.data.create_dataset`; alone it is evaluated leave-one-out.
        gallery: A second dataset searched by the queries (query/gallery protocol).
        device: ``"auto"`` (cuda, mps, cpu) or a device; under torchrun on CUDA each rank takes its local GPU.
        batch_size: Images per batch per process.
        workers: DataLoader workers for image folders (None: up to 8).
        limit: Use a seeded subset of this many samples of each dataset.
        input_size: Override the model's input size.
        amp: None: bf16 + channels_last on CUDA only; True: also on CPU; False: float32 everywhere.
        metrics: See :func:`evaluate_embeddings`.
        recall_k: See :func:`evaluate_embeddings`; None: the dataset's own (a retrieval benchmark's papers' k),
            else 1, 2, 4, 8.
        knn: See :func:`evaluate_embeddings`.
        tta: Test-time augmentation, one of :data:`~headreg.engine.extract.TTA_MODES`; None: ``none``, or
            ``flip-sum`` for a pairs dataset (``bin:PATH``), which runs the pairs protocol
            (:mod:`headreg.engine._pairs`); ``flip-sum`` too for IJB (``ijbb:DIR``, :mod:`headreg.engine._ijb`).
        detector_score: IJB only: weight each face by its detector score in its template (insightface's default).
        progress: Progress bars; None shows them when stderr is a terminal (and on rank 0 only).
        shard_gallery: Keep each rank's embeddings where they were extracted and run the exact k-NN search
            gallery-sharded (:mod:`headreg.engine._shard_eval`): retrieval and classification only, and the
            result's tensors hold this rank's rows.

    Returns:
        The same :class:`EvalResult` on every rank (its metrics, under ``shard_gallery``).
    """
    from headreg.engine.runtime import dist_info, resolve_device

    info = dist_info()
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and info.is_distributed:
        dev = torch.device("cuda", torch.cuda.current_device())  # init_distributed chose LOCAL_RANK's GPU
    show = None if progress is None else bool(progress)
    if info.rank != 0:
        show = False
    common = dict(device=dev, batch_size=batch_size, workers=workers, limit=limit, input_size=input_size, amp=amp)
    if shard_gallery:
        from headreg.engine._shard_eval import check_sharded_metrics, evaluate_sharded

        check_sharded_metrics(parse_metric_names(metrics), knn, query)  # before any extraction, alike on every rank
    if getattr(query, "issame", None) is not None:
        from headreg.engine._pairs import evaluate_pairs_model

        fields = evaluate_pairs_model(
            model, query, gallery, common=common, metrics=parse_metric_names(metrics), tta=tta,
            progress=_tqdm_flag(show), world_size=info.world_size,
        )  # fmt: skip
        return EvalResult(**fields)
    if getattr(query, "protocol", None) == "ijb":
        from headreg.engine._ijb import evaluate_ijb_model

        fields = evaluate_ijb_model(
            model, query, gallery, common=common, metrics=parse_metric_names(metrics), tta=tta,
            detector_score=detector_score, progress=_tqdm_flag(show), world_size=info.world_size,
        )  # fmt: skip
        return EvalResult(**fields)
    if tta is not None:
        common["tta"] = tta
    parts: list[Extraction] = []
    for name, ds in (("query", query), ("gallery", gallery)):
        if ds is None:
            continue
        desc = "extract" if gallery is None else f"extract {name}"
        part = extract_dataset(model, ds, progress=_tqdm_flag(show), desc=desc, **common)  # type: ignore[arg-type]
        parts.append(part if shard_gallery else gather_extraction(part))
    if getattr(query, "unseen_classes", False):  # no head was trained on these classes: no top-k accuracy
        parts = [replace(p, label_rank=None) for p in parts]
    if shard_gallery:
        fields = evaluate_sharded(
            parts, metrics=parse_metric_names(metrics), recall_k=dataset_recall_k(query, recall_k), device=dev,
            world_size=info.world_size, num_classes=int(getattr(model, "num_classes", 0) or 0),
            progress=bool(_tqdm_flag(show)),
        )  # fmt: skip
        if getattr(query, "categories", None) is not None:
            fields["warnings"] = [*fields["warnings"], "per-category metrics are left out under --shard-gallery"]
        return EvalResult(**fields)
    categories = None
    if len(parts) == 1:
        # A dataset may carry query/gallery roles (In-shop, a CSV) and categories: of the rows extracted.
        ext = parts[0]
        embeddings, labels, label_rank = ext.embeddings, ext.labels, ext.label_rank
        is_query, is_gallery, categories = dataset_roles(query, ext.indices)
    else:
        q, g = parts
        embeddings, labels, is_query, is_gallery = combine_query_gallery(q.embeddings, q.labels, g.embeddings, g.labels)
        label_rank = None
        if q.label_rank is not None and g.label_rank is not None:
            label_rank = torch.cat([q.label_rank, g.label_rank])

    def compute() -> tuple[dict[str, float | int], list[str]]:
        return evaluate_embeddings(
            embeddings,
            labels,
            is_query=is_query,
            is_gallery=is_gallery,
            label_rank=label_rank,
            metrics=metrics,
            recall_k=dataset_recall_k(query, recall_k),
            knn=knn,
            progress=bool(_tqdm_flag(show)),
            categories=categories,
        )

    values, warnings = broadcast_from_main(compute)
    if label_rank is not None:
        warnings = [*warnings, *labels_outside_head(labels, int(getattr(model, "num_classes", 0) or 0))]
    run_info = {
        "protocol": "leave-one-out" if is_query is None else "query/gallery",
        "num_samples": int(embeddings.shape[0]),
        "num_queries": int(embeddings.shape[0] if is_query is None else is_query.sum()),
        "num_gallery": int(embeddings.shape[0] if is_gallery is None else is_gallery.sum()),
        "embedding_dim": int(embeddings.shape[1]),
        **extraction_info(parts, dev, info.world_size),
        **({"tta": tta} if tta is not None else {}),
    }
    return EvalResult(
        metrics=values,
        embeddings=embeddings.detach().cpu(),
        labels=labels.cpu(),
        is_query=None if is_query is None else is_query.cpu(),
        is_gallery=None if is_gallery is None else is_gallery.cpu(),
        label_rank=None if label_rank is None else label_rank.cpu(),
        info=run_info,
        warnings=warnings,
    )


def _tqdm_flag(show: bool | None) -> bool:
    if show is None:
        import sys

        return sys.stderr.isatty()
    return show
