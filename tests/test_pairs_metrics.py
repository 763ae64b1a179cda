"""The pairs protocol against an independent reference of insightface's ``evaluate()``, to 1e-9."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headreg.errors import InvalidInputError, InvalidValueError
from headreg.metrics.pairs import PAIRS_KEYS, fold_sizes, pairs_metrics

sk_model_selection = pytest.importorskip("sklearn.model_selection")
sk_preprocessing = pytest.importorskip("sklearn.preprocessing")
sk_metrics = pytest.importorskip("sklearn.metrics")
interpolate = pytest.importorskip("scipy.interpolate")


def _rates(threshold, dist, same):
    """(accepted same / same, accepted different / different, accuracy) with accept = dist < threshold."""
    accept = dist < threshold
    tp, fp = np.sum(accept & same), np.sum(accept & ~same)
    tn, fn = np.sum(~accept & ~same), np.sum(~accept & same)
    tpr = 0.0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0.0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def reference(embeddings: np.ndarray, same: np.ndarray, folds: int = 10) -> dict[str, float]:
    """insightface's published algorithm, threshold by threshold: sklearn's normalize and KFold, scipy's interp1d."""
    emb = sk_preprocessing.normalize(embeddings.astype(np.float64))
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    kfold = sk_model_selection.KFold(n_splits=folds, shuffle=False)
    thresholds = np.arange(0, 4, 0.01)
    accuracy, best = [], []
    for train, test in kfold.split(np.arange(same.size)):
        acc_train = [_rates(t, dist[train], same[train])[2] for t in thresholds]
        b = int(np.argmax(acc_train))
        best.append(thresholds[b])
        accuracy.append(_rates(thresholds[b], dist[test], same[test])[2])
    thresholds = np.arange(0, 4, 0.001)
    val, far = [], []
    for train, test in kfold.split(np.arange(same.size)):
        far_train = np.array([_rates(t, dist[train], same[train])[1] for t in thresholds])
        if np.max(far_train) >= 1e-3:
            uniq, first = np.unique(far_train, return_index=True)  # the documented fix for repeated FARs
            threshold = interpolate.interp1d(uniq, thresholds[first], kind="slinear")(1e-3)
        else:
            threshold = 0.0
        accept = np.less(dist[test], threshold)
        val.append(float(np.sum(accept & same[test])) / float(np.sum(same[test])))
        far.append(float(np.sum(accept & ~same[test])) / float(np.sum(~same[test])))
    # The ROC over all pairs, scikit-learn's; the EER interpolated between its points where FNR crosses FPR.
    fpr, tpr, _ = sk_metrics.roc_curve(same.astype(int), -dist, drop_intermediate=False)
    fnr = 1 - tpr
    i = int(np.argmax(fnr <= fpr))
    d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
    w = d0 / (d0 - d1)
    eer = ((fpr[i - 1] + w * (fpr[i] - fpr[i - 1])) + (fnr[i - 1] + w * (fnr[i] - fnr[i - 1]))) / 2
    return {
        "kfold_accuracy": np.mean(accuracy),
        "kfold_accuracy_std": np.std(accuracy),
        "val_at_far": np.mean(val),
        "val_at_far_std": np.std(val),
        "far": np.mean(far),
        "roc_auc": sk_metrics.roc_auc_score(same.astype(int), -dist),
        "eer": eer,
        "best_threshold": np.mean(best),
    }


def _tied_pairs(seed: int, num_pairs: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pairs with many exact ties: coarse integer coordinates, repeated pairs, identical and orthogonal
    members (distance exactly 0 and 2, values on the threshold grids)."""
    gen = torch.Generator().manual_seed(seed)
    same = torch.rand(num_pairs, generator=gen) < 0.5
    a = torch.randint(-3, 4, (num_pairs, dim), generator=gen).float()
    noise = torch.randint(-2, 3, (num_pairs, dim), generator=gen).float()
    b = torch.where(same[:, None], a + noise, torch.randint(-3, 4, (num_pairs, dim), generator=gen).float())
    b[::7] = a[::7]  # distance 0
    a[3::11], b[3::11] = torch.eye(dim)[0], torch.eye(dim)[1]  # distance exactly 2.0
    a[a.abs().sum(1) == 0, 0] = 1.0
    b[b.abs().sum(1) == 0, 1] = 1.0
    a[num_pairs // 2 : num_pairs // 2 + 20], b[num_pairs // 2 : num_pairs // 2 + 20] = a[:20], b[:20]  # repeats
    same[num_pairs // 2 : num_pairs // 2 + 20] = same[:20]
    return torch.stack([a, b], 1).reshape(2 * num_pairs, dim), same


@pytest.mark.parametrize(("seed", "num_pairs", "dim"), [(0, 600, 4), (1, 347, 3), (2, 1203, 8)])
def test_equals_insightface_reference(seed, num_pairs, dim):
    emb, same = _tied_pairs(seed, num_pairs, dim)
    ours = pairs_metrics(emb, same)
    ref = reference(emb.numpy(), same.numpy())
    assert tuple(ours) == PAIRS_KEYS
    for key in PAIRS_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key


def test_equals_reference_on_separable_gaussians():
    gen = torch.Generator().manual_seed(5)
    same = torch.rand(1000, generator=gen) < 0.5
    a = torch.randn(1000, 16, generator=gen)
    b = torch.where(same[:, None], a + 0.8 * torch.randn(1000, 16, generator=gen), torch.randn(1000, 16, generator=gen))
    emb = torch.stack([a, b], 1).reshape(2000, 16)
    ours, ref = pairs_metrics(emb, same), reference(emb.numpy(), same.numpy())
    for key in PAIRS_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    assert ours["val_at_far"] > 0  # the interpolated branch ran


def test_fold_sizes_match_kfold():
    for p in (10, 23, 600, 6001):
        sizes = [len(test) for _, test in sk_model_selection.KFold(10).split(np.arange(p))]
        assert fold_sizes(p, 10).tolist() == sizes


def test_checks_at_the_entry():
    emb, same = _tied_pairs(0, 40, 4)
    with pytest.raises(InvalidInputError, match="2 x 40 = 80 rows"):
        pairs_metrics(emb[:-2], same)
    with pytest.raises(InvalidInputError, match="issame must be"):
        pairs_metrics(emb, same.long())
    bad = emb.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN|non-finite"):
        pairs_metrics(bad, same)
    with pytest.raises(InvalidValueError, match="folds"):
        pairs_metrics(emb, same, folds=41)
    one_sided = same.clone()
    one_sided[:4] = True
    with pytest.raises(InvalidInputError, match="fold 1 of 10"):
        pairs_metrics(emb, one_sided)
