"""The face-verification pairs protocol: 10-fold accuracy and VAL@FAR on ``P`` labelled pairs.

This is the protocol of LFW, CFP, AgeDB and the other insightface validation sets, computed as insightface's
``recognition/arcface_torch/eval/verification.py`` ``evaluate()`` computes it, to the last bit where the
arithmetic allows (docs/protocols.md):

* the rows are L2-normalised in float64 and the pair distance is the squared L2 distance of the two members,
  ``d = ||e_2p - e_2p+1||^2`` in ``[0, 4]``; a pair is predicted "same" when ``d < t`` (strictly);
* the ``P`` pairs are cut into ``folds`` contiguous folds in file order (scikit-learn ``KFold(folds)``
  without shuffling: the first ``P mod folds`` folds hold one pair more), so LFW's folds are its 10 sets;
* **accuracy**: for each fold, the threshold of ``np.arange(0, 4, 0.01)`` with the best accuracy on the other
  folds (the first one on a tie) is applied to the fold; mean and (population) standard deviation over folds;
* **VAL@FAR**: for each fold, the FAR of the other folds on ``np.arange(0, 4, 0.001)`` is interpolated
  linearly (scipy ``interp1d(kind="slinear")``) to the threshold where FAR = ``far_target``, or 0 when the
  target is never reached; VAL and FAR are then measured on the fold. The FAR curve repeats values, which
  current scipy refuses to interpolate: the first threshold of each repeated FAR value is kept.
* ``roc_auc`` and ``eer`` are those of :func:`headreg.metrics.verification.verification_from_scores` over all
  ``P`` pairs (the exact ROC, not the fold-averaged grid; insightface's ``evaluate()`` reports neither).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from headreg._checks import check_embeddings
from headreg.errors import InvalidInputError, InvalidValueError

__all__ = [
    "ACCURACY_THRESHOLDS",
    "PAIRS_KEYS",
    "VAL_THRESHOLDS",
    "check_pairs",
    "fold_sizes",
    "pair_distances",
    "pairs_metrics",
]

#: The keys of :func:`pairs_metrics`, in the order they are reported.
PAIRS_KEYS = (
    "kfold_accuracy",
    "kfold_accuracy_std",
    "val_at_far",
    "val_at_far_std",
    "far",
    "roc_auc",
    "eer",
    "best_threshold",
)
#: insightface's grid for the accuracy threshold (squared L2 distance of unit vectors lies in [0, 4]).
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
#: insightface's finer grid for the VAL@FAR threshold.
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def check_pairs(embeddings: Any, issame: Any, where: str = "", *, finite: bool = True) -> tuple[Tensor, Tensor]:
    """Check ``(2P, D)`` float embeddings (pair members interleaved) and ``(P,)`` bool ``issame``, ``P >= 1``.

    Args:
        embeddings: ``(2P, D)`` floating tensor.
        issame: ``(P,)`` bool tensor.
        where: Prefix of the messages (``"in FILE: "``).
        finite: Also scan the embeddings for NaN / Inf (a file's structural check passes False).

    Returns:
        ``(embeddings, issame)`` unchanged.

    Raises:
        InvalidInputError: naming the argument, what was received and what was expected.
    """
    check_embeddings(embeddings, f"{where}embeddings", finite=finite)
    if not isinstance(issame, Tensor) or issame.dtype != torch.bool or issame.ndim != 1 or issame.numel() < 1:
        got = f"{tuple(issame.shape)} {issame.dtype}" if isinstance(issame, Tensor) else type(issame).__name__
        raise InvalidInputError(f"{where}issame must be a non-empty (P,) bool tensor, got {got}")
    if embeddings.shape[0] != 2 * issame.numel():
        raise InvalidInputError(
            f"{where}embeddings must have 2 x {issame.numel()} = {2 * issame.numel()} rows (two per pair, "
            f"interleaved), got {embeddings.shape[0]}"
        )
    return embeddings, issame


def fold_sizes(num_pairs: int, folds: int) -> np.ndarray:
    """Sizes of the contiguous folds, as scikit-learn's ``KFold``: the first ``num_pairs % folds`` get one more."""
    sizes = np.full(folds, num_pairs // folds, dtype=np.int64)
    sizes[: num_pairs % folds] += 1
    return sizes


def pair_distances(embeddings: Tensor) -> np.ndarray:
    """``(P,)`` float64 squared L2 distances of the L2-normalised members of each pair.

    Rows are normalised in float64 as scikit-learn's ``normalize`` does (a zero row stays zero), so the
    distances are insightface's to the bit.

    Args:
        embeddings: ``(2P, D)`` float, pair members interleaved.
    """
    x = embeddings.detach().to("cpu", torch.float64).numpy()
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    x = x / norms[:, None]
    return np.sum(np.square(x[0::2] - x[1::2]), 1)


def _below(sorted_dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``sorted_dist`` lie strictly below each threshold (insightface's ``dist < t``)."""
    return np.searchsorted(sorted_dist, thresholds, side="left")


def _far_threshold(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """The threshold where the (non-decreasing) FAR curve reaches ``target``; 0 when it never does."""
    from scipy.interpolate import interp1d

    if np.max(far) < target:
        return 0.0
    # Repeated FAR values make interp1d refuse the curve; the first threshold of each is kept.
    values, first = np.unique(far, return_index=True)
    return float(interp1d(values, thresholds[first], kind="slinear")(target))


def _pairs_metrics(dist: np.ndarray, same: np.ndarray, folds: int, far_target: float) -> dict[str, float]:
    """The 10-fold protocol on checked input: ``dist`` ``(P,)`` float64, ``same`` ``(P,)`` bool."""
    bounds = np.concatenate([[0], np.cumsum(fold_sizes(dist.size, folds))])
    t_acc, t_val = ACCURACY_THRESHOLDS, VAL_THRESHOLDS
    pos_all, neg_all = np.sort(dist[same]), np.sort(dist[~same])
    n_neg_all = neg_all.size
    # Per threshold, how many same / different pairs of all P fall below it: a training set's counts are
    # these minus its test fold's, so each fold costs one sort of its own pairs, not of the other nine.
    acc_pos, acc_neg = _below(pos_all, t_acc), _below(neg_all, t_acc)
    val_neg = _below(neg_all, t_val)
    accuracy, best, val, far = (np.zeros(folds) for _ in range(4))
    for f in range(folds):
        d, s = dist[bounds[f] : bounds[f + 1]], same[bounds[f] : bounds[f + 1]]
        pos, neg = np.sort(d[s]), np.sort(d[~s])
        n_train, n_neg_train = dist.size - d.size, n_neg_all - neg.size
        tp = acc_pos - _below(pos, t_acc)
        tn = n_neg_train - (acc_neg - _below(neg, t_acc))
        b = int(np.argmax((tp + tn) / n_train))
        best[f] = t_acc[b]
        accuracy[f] = (np.sum(pos < t_acc[b]) + np.sum(neg >= t_acc[b])) / d.size
        threshold = _far_threshold((val_neg - _below(neg, t_val)) / n_neg_train, t_val, far_target)
        val[f] = np.sum(pos < threshold) / pos.size
        far[f] = np.sum(neg < threshold) / neg.size
    return {
        "kfold_accuracy": float(np.mean(accuracy)),
        "kfold_accuracy_std": float(np.std(accuracy)),
        "val_at_far": float(np.mean(val)),
        "val_at_far_std": float(np.std(val)),
        "far": float(np.mean(far)),
        "best_threshold": float(np.mean(best)),
    }


def pairs_metrics(
    embeddings: Tensor, issame: Tensor, *, folds: int = 10, far_target: float = 1e-3
) -> dict[str, float | int]:
    """The pairs protocol of insightface's ``evaluate()`` (see the module docstring), plus ROC-AUC and EER.

    Args:
        embeddings: ``(2P, D)`` float embeddings, not necessarily normalised; pair ``p`` is rows ``2p`` and
            ``2p + 1`` (the ``.bin`` order).
        issame: ``(P,)`` bool, whether each pair shows one identity.
        folds: Number of contiguous folds (10 in every published protocol).
        far_target: The false-accept rate of VAL@FAR.

    Returns:
        ``kfold_accuracy``, ``kfold_accuracy_std``, ``val_at_far``, ``val_at_far_std``, ``far`` (the mean FAR
        measured at the VAL thresholds), ``roc_auc``, ``eer`` and ``best_threshold`` (the mean over the folds
        of the accuracy threshold, a squared L2 distance of unit vectors).

    Raises:
        InvalidInputError: bad shapes or non-finite embeddings; a fold without a same or a different pair.
        InvalidValueError: ``folds`` below 2 or above ``P``, ``far_target`` outside (0, 1].

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.0], [0.0, 1.0]]).repeat(10, 1)
        >>> same = torch.tensor([True, False]).repeat(10)
        >>> pairs_metrics(emb, same)["kfold_accuracy"]
        1.0
    """
    from headreg.metrics.verification import verification_from_scores

    check_pairs(embeddings, issame)
    p = issame.numel()
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= p:
        raise InvalidValueError(f"folds must be an integer in [2, {p}] (the number of pairs), got {folds!r}")
    if not isinstance(far_target, (int, float)) or not 0.0 < far_target <= 1.0:
        raise InvalidValueError(f"far_target must be in (0, 1], got {far_target!r}")
    same = issame.detach().cpu().numpy()
    bounds = np.concatenate([[0], np.cumsum(fold_sizes(p, folds))])
    for f in range(folds):
        fold = same[bounds[f] : bounds[f + 1]]
        if fold.all() or not fold.any():
            raise InvalidInputError(
                f"fold {f + 1} of {folds} (pairs {bounds[f]} to {bounds[f + 1] - 1}) holds only "
                f"{'same' if fold.all() else 'different'} pairs; the {folds}-fold protocol needs both in every "
                "fold (the pairs are folded in file order)"
            )
    dist = pair_distances(embeddings)
    out: dict[str, float | int] = dict(_pairs_metrics(dist, same, folds, float(far_target)))
    roc = verification_from_scores(torch.from_numpy(-dist), torch.from_numpy(same), far_targets=())
    out["roc_auc"], out["eer"] = roc["roc_auc"], roc["eer"]
    return {k: out[k] for k in PAIRS_KEYS}
