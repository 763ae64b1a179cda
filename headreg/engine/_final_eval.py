"""Training's test metrics: each epoch's retrieval on unseen classes, and the end of a run (the last test pass
gathered, ``headreg eval``'s metrics on rank 0, ``eval.json``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._jsonsafe import json_safe
from ._roles import dataset_recall_k, dataset_roles
from .evaluate import evaluate_embeddings
from .extract import Extraction, gather_extraction

__all__ = ["evaluate_split", "final_evaluation"]


def final_evaluation(run: Any, last: Extraction) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Gather ``last`` (this rank's final test pass; a resumed run past its last epoch makes one more), compute
    the configured metrics on rank 0, write ``eval.json`` and say the result; returns it with the embeddings.

    ``run`` is the :class:`~headreg.engine._runner.Run` (typed loosely: it imports this module).
    """
    whole = gather_extraction(last)
    emb, labels = whole.embeddings.cpu(), whole.labels.cpu()
    result: dict[str, Any] = {}
    if run.ranks.main:
        cfg = run.config
        metrics: dict[str, Any] = {}
        notes: list[str] = []
        if cfg.eval_metrics:
            ds = run.session.test_loader.dataset
            metrics, notes = evaluate_split(
                whole, ds, cfg.eval_metrics, limit=cfg.eval_limit, seed=cfg.seed, per_category=True
            )
        acc = run.log.history[-1].get("test_accuracy") if run.log.history else None
        result = {
            "dataset": cfg.dataset,
            "split": "test",
            "samples": int(labels.numel()),
            "metric_samples": min(int(labels.numel()), cfg.eval_limit or int(labels.numel())),
            "test_accuracy": acc,
            "metrics": json_safe(metrics),
            "warnings": notes,
        }
        run.run_dir.write_eval(result)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k)
        head = "unseen classes" if acc is None else f"accuracy {acc:.4f}"
        run.log.say(f"final test evaluation: {head}, {shown}")
    return result, emb, labels


def evaluate_split(
    whole: Any,
    dataset: Any,
    metrics: tuple[str, ...],
    *,
    per_category: bool = False,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    """``headreg eval``'s metrics of a gathered test pass (an ``Extraction``) of ``dataset``: its query/gallery roles,
    categories (with ``per_category``) and Recall@K k; ``limit`` draws a seeded subset of the rows first."""
    emb, labels = whole.embeddings.cpu(), whole.labels.cpu()
    is_query, is_gallery, categories = dataset_roles(dataset, None if whole.indices is None else whole.indices.cpu())
    if limit is not None and limit < labels.numel():
        pick = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))[:limit]
        emb, labels = emb[pick], labels[pick]
        is_query, is_gallery = (None if m is None else m[pick] for m in (is_query, is_gallery))
        categories = None if categories is None else [categories[i] for i in pick.tolist()]
    return evaluate_embeddings(
        emb, labels, is_query=is_query, is_gallery=is_gallery, metrics=metrics, recall_k=dataset_recall_k(dataset),
        categories=categories if per_category else None,
    )  # fmt: skip
