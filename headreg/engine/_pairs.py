"""The pairs protocol in the evaluation pipeline: a pairs dataset (``bin:PATH``) or pair embeddings → metrics.

:func:`headreg.engine.evaluate.evaluate_model` routes here when its dataset carries ``issame`` (a
:class:`~headreg.data._pairs.PairsDataset`); ``headreg eval --embeddings`` when the file holds ``issame``. The
images go through the one inference pass (:func:`~headreg.engine.extract.extract_dataset`), with the flip
test-time augmentation face protocols use by default; the maths is :func:`headreg.metrics.pairs.pairs_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from headreg.engine.extract import TTA_MODES, extract_dataset, extraction_info, gather_extraction
from headreg.errors import InvalidValueError

__all__ = ["DEFAULT_PAIRS_TTA", "evaluate_pair_embeddings", "evaluate_pairs_model", "pairs_info"]

#: The test-time augmentation of face pair protocols unless the caller names one (insightface's "Accuracy-Flip").
DEFAULT_PAIRS_TTA = "flip-sum"


def pairs_info(embeddings: Tensor, issame: Tensor) -> dict[str, Any]:
    """The ``info`` sizes of a pairs evaluation: each pair's first member queries its second."""
    p = int(issame.numel())
    return {
        "protocol": "pairs",
        "num_samples": int(embeddings.shape[0]),
        "num_queries": p,
        "num_gallery": p,
        "num_pairs": p,
        "embedding_dim": int(embeddings.shape[1]),
    }


def evaluate_pair_embeddings(
    embeddings: Tensor, issame: Tensor, *, metrics: Sequence[str] | None = None
) -> tuple[dict[str, float | int], list[str]]:
    """The pairs metrics of ``(2P, D)`` interleaved embeddings (single process; checks at the entry).

    Args:
        embeddings: ``(2P, D)`` float, pair ``p`` in rows ``2p`` and ``2p + 1``.
        issame: ``(P,)`` bool.
        metrics: Parsed ``--metrics`` names; the pairs protocol computes verification only, so anything else is
            refused (None: the protocol's metrics).

    Returns:
        ``(metrics, warnings)``.

    Raises:
        InvalidValueError: metric families the pairs protocol does not compute.
        InvalidInputError: bad shapes, non-finite embeddings, a fold without a same or a different pair.
    """
    from headreg.metrics.pairs import pairs_metrics

    if metrics is not None and set(metrics) != {"verification"}:
        raise InvalidValueError(
            f"the pairs protocol computes verification metrics only (10-fold accuracy, VAL@FAR, ROC-AUC, EER), "
            f"got --metrics {','.join(metrics)}; leave --metrics out or give 'verification'"
        )
    return pairs_metrics(embeddings, issame.to(embeddings.device)), []


def evaluate_pairs_model(
    model: nn.Module,
    dataset: Any,
    gallery: Any | None,
    *,
    common: dict[str, Any],
    metrics: Sequence[str] | None,
    tta: str | None,
    progress: bool,
    world_size: int,
) -> dict[str, Any]:
    """Extract the ``2P`` images of ``dataset`` and run the pairs protocol on rank 0 (every rank gets the result).

    Args:
        model: As :func:`~headreg.engine.evaluate.evaluate_model`.
        dataset: A pairs dataset (``issame`` attribute).
        gallery: Must be None: pairs carry their own second members.
        common: The extraction options (device, batch size, workers, limit, input size, amp).
        metrics: Parsed ``--metrics`` names, or None.
        tta: One of :data:`~headreg.engine.extract.TTA_MODES`; None: :data:`DEFAULT_PAIRS_TTA`.
        progress: Progress bars.
        world_size: Processes, for ``info``.

    Returns:
        The fields of an :class:`~headreg.engine.evaluate.EvalResult` (``issame`` included).
    """
    from headreg._checks import check_choice
    from headreg.engine.runtime import run_on_main

    if gallery is not None:
        raise InvalidValueError("a pairs dataset holds both members of each pair: it takes no gallery")
    if common.get("limit") is not None:
        raise InvalidValueError("--limit would cut pairs apart: the pairs protocol evaluates every pair of the file")
    tta = check_choice(DEFAULT_PAIRS_TTA if tta is None else tta, TTA_MODES, "tta")
    ext = gather_extraction(extract_dataset(model, dataset, tta=tta, progress=progress, desc="extract pairs", **common))
    issame = dataset.issame.to(ext.embeddings.device)
    values, warnings = run_on_main(lambda: evaluate_pair_embeddings(ext.embeddings, issame, metrics=metrics))
    info = {**pairs_info(ext.embeddings, issame), "tta": tta, **extraction_info([ext], common["device"], world_size)}
    return {
        "metrics": values,
        "embeddings": ext.embeddings.detach().cpu(),
        "labels": ext.labels.cpu(),
        "issame": issame.cpu(),
        "info": info,
        "warnings": warnings,
    }
