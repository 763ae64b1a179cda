"""The IJB-B / IJB-C 1:1 protocol in the evaluation pipeline: aligned faces → embeddings → template pairs.

:func:`headreg.engine.evaluate.evaluate_model` routes here when its dataset's ``protocol`` is ``"ijb"``
(``--dataset ijbb:DIR`` / ``ijbc:DIR``, :class:`~headreg.data._ijb.IJBDataset`). The faces go through the one
inference pass (:func:`~headreg.engine.extract.extract_dataset`) with insightface's flip-sum TTA by default; rank
0 computes :func:`headreg.metrics.ijb.ijb_metrics` and every rank gets the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from headreg.engine.extract import TTA_MODES, extract_dataset, extraction_info, gather_extraction
from headreg.errors import InvalidValueError

__all__ = ["DEFAULT_IJB_TTA", "evaluate_ijb_embeddings", "evaluate_ijb_model"]

#: insightface's IJB evaluation adds the mirror's embedding to the image's ("F2").
DEFAULT_IJB_TTA = "flip-sum"


def evaluate_ijb_embeddings(
    embeddings: Tensor, meta: Any, *, detector_score: bool = True, progress: bool = False
) -> dict[str, Any]:
    """The IJB metrics of per-face embeddings in the order of ``meta`` (checks at the entry).

    Args:
        embeddings: ``(N, D)`` float, face ``i`` in row ``i``.
        meta: The :class:`~headreg.data._ijb.IJBMeta` of the benchmark.
        detector_score: Weight each face by its detector score (insightface's default).
        progress: A progress bar over the pair scores.

    Raises:
        InvalidInputError: bad shapes or non-finite embeddings.
    """
    from headreg._checks import check_embeddings
    from headreg.errors import InvalidInputError
    from headreg.metrics.ijb import ijb_metrics

    check_embeddings(embeddings, "IJB face embeddings")
    if embeddings.shape[0] != len(meta.images):
        raise InvalidInputError(
            f"IJB face embeddings must have one row per face ({len(meta.images)}), got {embeddings.shape[0]}"
        )
    as_tensor = torch.from_numpy
    return ijb_metrics(
        embeddings,
        as_tensor(meta.templates),
        as_tensor(meta.medias),
        as_tensor(meta.pair_templates),
        as_tensor(meta.pair_labels),
        scores=as_tensor(meta.scores) if detector_score else None,
        progress=progress,
    )


def evaluate_ijb_model(
    model: nn.Module,
    dataset: Any,
    gallery: Any | None,
    *,
    common: dict[str, Any],
    metrics: Sequence[str] | None,
    tta: str | None,
    detector_score: bool,
    progress: bool,
    world_size: int,
) -> dict[str, Any]:
    """Extract the aligned faces of ``dataset`` and run the IJB 1:1 protocol on rank 0 (every rank gets it).

    Args:
        model: As :func:`~headreg.engine.evaluate.evaluate_model`.
        dataset: An :class:`~headreg.data._ijb.IJBDataset`.
        gallery: Must be None: the pair list names both templates.
        common: The extraction options (device, batch size, workers, limit, input size, amp).
        metrics: Parsed ``--metrics`` names (only ``verification``), or None.
        tta: One of :data:`~headreg.engine.extract.TTA_MODES`; None: :data:`DEFAULT_IJB_TTA`.
        detector_score: Weight faces by their detector scores.
        progress: Progress bars.
        world_size: Processes, for ``info``.

    Returns:
        The fields of an :class:`~headreg.engine.evaluate.EvalResult`; its labels are the faces' template ids.
    """
    from headreg._checks import check_choice
    from headreg.engine.runtime import run_on_main
    from headreg.metrics.ijb import IJB_FAR_TARGETS

    if gallery is not None:
        raise InvalidValueError("an IJB benchmark lists its template pairs itself: it takes no gallery")
    if common.get("limit") is not None:
        raise InvalidValueError("--limit would drop faces from templates: the IJB protocol evaluates every face")
    if metrics is not None and set(metrics) != {"verification"}:
        raise InvalidValueError(
            f"the IJB protocol computes verification metrics only (TAR@FAR, ROC-AUC), got --metrics "
            f"{','.join(metrics)}; leave --metrics out or give 'verification'"
        )
    tta = check_choice(DEFAULT_IJB_TTA if tta is None else tta, TTA_MODES, "tta")
    ext = gather_extraction(extract_dataset(model, dataset, tta=tta, progress=progress, desc="extract faces", **common))
    meta = dataset.meta
    values = run_on_main(
        lambda: evaluate_ijb_embeddings(ext.embeddings, meta, detector_score=detector_score, progress=progress)
    )
    num_pairs = int(meta.pair_labels.shape[0])
    negatives = int(values["num_negative_pairs"])
    # Reported as insightface does (the nearest ROC point), but say when a FAR is finer than one false accept.
    unresolved = [f"{far:.0e}" for far in IJB_FAR_TARGETS if negatives * far < 1]
    warnings = (
        [
            f"{negatives} different pairs cannot resolve FAR {', '.join(unresolved)} (fewer than one false accept); "
            "those TARs are read at the ROC point nearest each, as insightface reads them"
        ]
        if unresolved
        else []
    )
    info = {
        "protocol": "ijb",
        "num_samples": int(ext.embeddings.shape[0]),
        "num_queries": num_pairs,
        "num_gallery": num_pairs,
        "num_pairs": num_pairs,
        "num_templates": int(values["num_templates"]),
        "embedding_dim": int(ext.embeddings.shape[1]),
        "tta": tta,
        "detector_score": bool(detector_score),
        **extraction_info([ext], common["device"], world_size),
    }
    return {
        "metrics": values,
        "embeddings": ext.embeddings.detach().cpu(),
        "labels": torch.from_numpy(meta.templates),
        "info": info,
        "warnings": warnings,
    }
