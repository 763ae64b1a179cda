"""IJB-B / IJB-C 1:1 verification: template features, template-pair scores, TAR at FAR.

The protocol of insightface's ``recognition/arcface_torch/eval_ijbc.py`` (and ``_evaluation_/ijb/ijb_11.py``),
step by step (docs/protocols.md):

1. each face's embedding (with flip TTA: the image's plus its mirror's, not normalised) is multiplied by its
   detector score when ``detector_score`` is on (insightface's default, "D1");
2. **template features**: the mean over each media's faces, summed over the template's medias, then
   L2-normalised;
3. **scores**: the cosine of the two template features of each pair;
4. **TAR@FAR**: scikit-learn's ``roc_curve`` over all pairs (``drop_intermediate=True``), and for each target
   FAR the TPR of the ROC point whose FPR is *nearest* the target, the one with the highest TPR on a tie
   (insightface's ``min(zip(abs(fpr - x), range(len(fpr))))`` over the flipped curve). Not interpolated.

Everything is computed in float64 (insightface takes the media means in float32, so its scores differ from
these in the 7th digit). Pairs are scored in blocks of templates (:func:`score_template_pairs`): never a
``P x D`` copy of the features, which for IJB-C's 15.7 M pairs would be 64 GB.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from headreg.errors import InvalidInputError
from headreg.metrics._base import stage_bar
from headreg.metrics.verification import _far_key, roc_counts

__all__ = ["IJB_FAR_TARGETS", "ijb_metrics", "score_template_pairs", "tar_at_far_nearest", "template_features"]

#: insightface's table: 1e-6 ... 1e-1, written as it computes them (``10 ** -k``).
IJB_FAR_TARGETS = tuple(10.0**-k for k in (6, 5, 4, 3, 2, 1))
#: Entries of one block of template-by-template scores (float64: 64 MiB).
_BLOCK_ELEMENTS = 1 << 23
#: A block of first templates is scored against every template when its pairs fill 1/128 of that product or more:
#: a gathered pair costs ~140 matmul entries on a CPU (benchmarks/bench_ijb.py, docs/benchmarks.md).
_DENSE_RATIO = 128
#: Pairs gathered at a time on the sparse path (two 512-d float64 rows each: 8 MiB, cache-friendly).
_GATHER_PAIRS = 1024


def template_features(
    embeddings: Tensor, templates: Tensor, medias: Tensor, weights: Tensor | None = None, *, rows: int = 8192
) -> tuple[Tensor, Tensor]:
    """Template features as insightface's ``image2template_feature``: media means summed per template, normalised.

    Args:
        embeddings: ``(N, D)`` face embeddings.
        templates: ``(N,)`` int template of each face.
        medias: ``(N,)`` int media of each face.
        weights: ``(N,)`` per-face factors (detector scores), or None.
        rows: Faces converted to float64 at a time.

    Returns:
        ``(ids, features)``: the sorted distinct template ids ``(T,)`` and ``(T, D)`` float64 unit rows (a row
        that sums to zero stays zero, as scikit-learn's ``normalize`` leaves it).
    """
    device = embeddings.device
    templates, medias = templates.to(device), medias.to(device)
    ids, template_of = torch.unique(templates, return_inverse=True)
    # Face i contributes e_i / |its media| to its template: the media's mean, summed over medias, in one pass.
    # A media is a (template, media id) pair: one integer key each (faster and leaner than unique over rows).
    media_ids, media_index = torch.unique(medias, return_inverse=True)
    key = template_of * media_ids.numel() + media_index
    _, media_of, media_size = torch.unique(key, return_inverse=True, return_counts=True)
    factor = 1.0 / media_size[media_of].double()
    if weights is not None:
        factor = factor * weights.to(device).double()
    features = torch.zeros(ids.numel(), embeddings.shape[1], dtype=torch.float64, device=device)
    for s in range(0, embeddings.shape[0], rows):
        block = embeddings[s : s + rows].to(torch.float64, copy=True).mul_(factor[s : s + rows, None])
        features.index_add_(0, template_of[s : s + rows], block)
    norms = features.norm(dim=1, keepdim=True)
    return ids, features / torch.where(norms == 0, torch.ones_like(norms), norms)


def score_template_pairs(
    ids: Tensor,
    features: Tensor,
    pairs: Tensor,
    *,
    block_elements: int = _BLOCK_ELEMENTS,
    strategy: str = "auto",
    progress: bool = False,
) -> Tensor:
    """Cosine score of each template pair, in blocks of first templates.

    Each pair is ordered by its lower template (the cosine is symmetric) and the pairs by it; each block of
    ``R`` templates ``r0, r0 + 1, ...`` is scored either by one ``R x (T - r0)`` product against the templates
    from ``r0`` on, when the block's pairs fill 1/128 of it or more (IJB-C's list fills 1/17), or by gathering
    its pairs' rows and a row-wise dot product (sparse lists). Memory beyond
    the inputs and the ``(P,)`` result: one block of ``block_elements`` float64 scores and the pair order.

    Args:
        ids: ``(T,)`` sorted template ids, as :func:`template_features` returns them.
        features: ``(T, D)`` unit template features.
        pairs: ``(P, 2)`` int template ids.
        block_elements: Scores per block.
        strategy: ``"auto"`` (by each block's density), ``"dense"`` or ``"gather"`` for every block.
        progress: A delayed progress bar over the pairs.

    Returns:
        ``(P,)`` float64 scores, in the order of ``pairs``.
    """
    from headreg._checks import check_choice

    check_choice(strategy, ("auto", "dense", "gather"), "strategy")
    device = features.device
    pairs = pairs.to(device)
    one = torch.searchsorted(ids, pairs[:, 0].contiguous())
    two = torch.searchsorted(ids, pairs[:, 1].contiguous())
    # The cosine is symmetric: a pair is scored from its lower template, so a block of templates needs the
    # templates from its own first onwards only (half the products of the whole matrix).
    first = torch.minimum(one, two)
    second = one.add_(two).sub_(first)  # the maximum, in place
    del one, two
    order = torch.argsort(first, stable=True)
    count = torch.bincount(first, minlength=ids.numel()).cpu()
    ends = torch.cumsum(count, 0).tolist()
    t = ids.numel()
    scores = torch.empty(pairs.shape[0], dtype=torch.float64, device=device)
    r0 = 0
    with stage_bar("score template pairs", pairs.shape[0], "pair", progress) as bar:
        while r0 < t:
            r1 = min(t, r0 + max(1, block_elements // (t - r0)))
            p0, p1 = (ends[r0 - 1] if r0 else 0), ends[r1 - 1]
            if p1 == p0:
                r0 = r1
                continue
            idx = order[p0:p1]
            a, b = first[idx], second[idx]
            product = (r1 - r0) * (t - r0)
            dense = _DENSE_RATIO * (p1 - p0) >= product if strategy == "auto" else strategy == "dense"
            if dense:
                block = features[r0:r1] @ features[r0:].T
                scores[idx] = block[a - r0, b - r0]
            else:
                step = max(1, min(_GATHER_PAIRS, block_elements // (2 * features.shape[1])))
                for q in range(0, p1 - p0, step):
                    sub = slice(q, q + step)
                    scores[idx[sub]] = (features[a[sub]] * features[b[sub]]).sum(1)
            r0 = r1
            bar.update(p1 - p0)
    return scores


def tar_at_far_nearest(
    scores: Tensor, same: Tensor, far_targets: tuple[float, ...] = IJB_FAR_TARGETS
) -> tuple[dict[str, float], float]:
    """TAR at each FAR as insightface reads it off scikit-learn's ``roc_curve``, and the ROC-AUC.

    The ROC keeps scikit-learn's points (``drop_intermediate=True``: a point collinear with its neighbours in
    both counts is dropped, then ``(0, 0)`` is prepended); for a target FAR the point with the nearest FPR is
    taken, the last one (highest TPR) on a tie.

    Returns:
        ``({"tar_at_far_1e-6": ..., ...}, roc_auc)``.
    """
    fps, tps, _ = roc_counts(scores, same)
    if fps.numel() > 2:
        corner = (torch.diff(fps, 2) != 0) | (torch.diff(tps, 2) != 0)
        ones = torch.ones(1, dtype=torch.bool, device=corner.device)
        keep = torch.cat([ones, corner, ones])
        fps, tps = fps[keep], tps[keep]
    zero = torch.zeros(1, dtype=torch.float64, device=fps.device)
    fpr = torch.cat([zero, fps]) / fps[-1]
    tpr = torch.cat([zero, tps]) / tps[-1]
    out: dict[str, float] = {}
    for far in far_targets:
        distance = (fpr - far).abs()
        nearest = torch.nonzero(distance == distance.min()).max()
        out[_far_key(far)] = float(tpr[nearest])
    return out, float(torch.trapz(tpr, fpr))


def ijb_metrics(
    embeddings: Tensor,
    templates: Tensor,
    medias: Tensor,
    pairs: Tensor,
    same: Tensor,
    *,
    scores: Tensor | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The IJB 1:1 metrics of per-face embeddings (unchecked core; :mod:`headreg.engine._ijb` checks).

    Args:
        embeddings: ``(N, D)`` per-face embeddings (flip-summed by the extraction when that TTA is on).
        templates: ``(N,)`` template ids.
        medias: ``(N,)`` media ids.
        pairs: ``(P, 2)`` template ids.
        same: ``(P,)`` bool.
        scores: ``(N,)`` detector scores to weight the faces by, or None.
        progress: A progress bar over the pair scores.

    Returns:
        ``tar_at_far_1e-6`` ... ``tar_at_far_1e-1``, ``roc_auc``, ``num_pairs``, ``num_positive_pairs``,
        ``num_negative_pairs``, ``num_templates``.
    """
    if bool(same.all()) or not bool(same.any()):
        raise InvalidInputError("IJB pairs must include both same and different pairs")
    ids, features = template_features(embeddings, templates, medias, scores)
    pair_scores = score_template_pairs(ids, features, pairs, progress=progress)
    tar, auc = tar_at_far_nearest(pair_scores, same.to(pair_scores.device))
    n_pos = int(same.sum())
    return {
        **tar,
        "roc_auc": auc,
        "num_pairs": int(same.numel()),
        "num_positive_pairs": n_pos,
        "num_negative_pairs": int(same.numel()) - n_pos,
        "num_templates": int(ids.numel()),
    }
