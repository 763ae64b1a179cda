"""Verification metrics against scikit-learn's ROC and hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headreg.errors import InvalidInputError
from headreg.metrics import VerificationMetrics
from headreg.metrics.verification import sample_pairs, verification_from_scores, verification_metrics

sk = pytest.importorskip("sklearn.metrics")


def reference(scores, same, fars):
    """scikit-learn ROC; EER by interpolation between ROC points; TAR@FAR by the ROC's upper envelope."""
    s, t = scores.double().numpy(), same.numpy().astype(int)
    fpr, tpr, _ = sk.roc_curve(t, s, drop_intermediate=False)
    fnr = 1 - tpr
    i = int(np.argmax(fnr <= fpr))
    d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
    w = d0 / (d0 - d1)
    eer = ((fpr[i - 1] + w * (fpr[i] - fpr[i - 1])) + (fnr[i - 1] + w * (fnr[i] - fnr[i - 1]))) / 2
    n_neg = (1 - t).sum()
    acc = max(((s >= th) == t).mean() for th in np.unique(s))
    out = {"roc_auc": sk.roc_auc_score(t, s), "eer": eer, "verification_accuracy": acc}
    for f in fars:
        out[f] = tpr[fpr <= f].max() if n_neg * f >= 1 else float("nan")
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_against_sklearn(seed):
    gen = torch.Generator().manual_seed(seed)
    same = torch.rand(3000, generator=gen) < 0.3
    scores = torch.randn(3000, generator=gen) * 0.3 + same * 0.4
    scores = (scores * 50).round() / 50  # many ties
    scores = scores.clamp(-1, 1)
    # torchmetrics builds the ROC in float32, hence 1e-6 below.
    ours = verification_from_scores(scores, same, far_targets=(1e-1, 1e-2, 1e-4))
    ref = reference(scores, same, (1e-1, 1e-2, 1e-4))
    assert ours["roc_auc"] == pytest.approx(ref["roc_auc"], abs=1e-6)
    assert ours["eer"] == pytest.approx(ref["eer"], abs=1e-6)
    assert ours["verification_accuracy"] == pytest.approx(
        ref["verification_accuracy"], abs=1e-6
    )  # torchmetrics builds the ROC in float32
    assert ours["tar_at_far_1e-1"] == pytest.approx(ref[1e-1], abs=1e-6)
    assert ours["tar_at_far_1e-2"] == pytest.approx(ref[1e-2], abs=1e-6)
    assert math.isnan(ours["tar_at_far_1e-4"])  # ~2,100 negatives cannot resolve 1e-4
    assert ours["num_positive_pairs"] == int(same.sum())


def test_hand_worked_case():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    same = torch.tensor([True, False, True, False])
    out = verification_from_scores(scores, same, far_targets=(0.5,))
    assert out["roc_auc"] == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered right
    assert out["tar_at_far_5e-1"] == 1.0  # threshold 0.7 accepts both positives and one negative of two
    assert out["verification_accuracy"] == 0.75
    assert out["eer"] == pytest.approx(0.5)


def test_pairs_from_labels_enumerated_and_capped():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    i, j, same = sample_pairs(y)
    assert int(same.sum()) == 3 + 1 and int((~same).sum()) == 15 - 4
    assert torch.equal(same, y[i] == y[j]) and bool((i != j).all())
    i, j, same = sample_pairs(y, max_pairs=2, seed=3)
    assert int(same.sum()) == 2 and int((~same).sum()) == 2
    assert torch.equal(same, y[i] == y[j])
    again = sample_pairs(y, max_pairs=2, seed=3)
    assert torch.equal(again[0], i) and torch.equal(again[1], j)


def test_pairs_sampled_when_too_many(monkeypatch):
    import headreg.metrics.verification as v

    monkeypatch.setattr(v, "_ENUMERABLE", 100)
    y = torch.arange(400) % 4
    i, j, same = sample_pairs(y, max_pairs=500, seed=1)
    assert int(same.sum()) == 500 and int((~same).sum()) == 500
    assert torch.equal(same, y[i] == y[j]) and bool((i != j).all())


def test_embeddings_and_explicit_pairs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=gen)
    y = torch.randint(0, 3, (60,), generator=gen)
    out = verification_metrics(x, y)
    i, j, same = sample_pairs(y)
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    scores = (xn[i] * xn[j]).sum(1)
    assert out["roc_auc"] == pytest.approx(sk.roc_auc_score(same.numpy(), scores.numpy()), abs=1e-6)
    explicit = verification_metrics(x, pairs=(i, j, same))
    assert explicit["roc_auc"] == out["roc_auc"]


def test_metric_class_matches_function_over_batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=gen)
    y = torch.randint(0, 4, (50,), generator=gen)
    metric = VerificationMetrics()
    for _ in range(2):
        for s in range(0, 50, 16):
            metric.update(x[s : s + 16], y[s : s + 16])
        got, want = metric.compute(), verification_metrics(x, y)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])), k
        metric.reset()


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="positive and negative"):
        verification_from_scores(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))
    with pytest.raises(InvalidInputError, match="labels or explicit pairs"):
        verification_metrics(torch.randn(4, 2))
    with pytest.raises(InvalidInputError, match=r"\[0, 4\)"):
        verification_metrics(torch.randn(4, 2), pairs=(torch.tensor([0]), torch.tensor([4]), torch.tensor([True])))
    with pytest.raises(InvalidInputError, match="finite"):
        verification_metrics(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.tensor([0, 1]))
