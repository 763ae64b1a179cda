"""Top-k accuracy against a brute-force reference and hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from headreg.errors import InvalidInputError
from headreg.metrics import ClassificationAccuracy
from headreg.metrics.classification import topk_accuracy


def reference(logits, labels, k):
    hits = 0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        larger = sum(v > row[y] for v in row)
        hits += larger < k
    return hits / len(labels)


def test_hand_worked():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    assert topk_accuracy(logits, labels, top_k=(1, 2, 3)) == {
        "top1_accuracy": 1 / 3,
        "top2_accuracy": 2 / 3,
        "top3_accuracy": 1.0,
    }


def test_random_against_reference_and_metric_over_batches():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=gen).round()  # ties
    labels = torch.randint(0, 10, (200,), generator=gen)
    ref = {f"top{k}_accuracy": reference(logits, labels, k) for k in (1, 5)}
    assert topk_accuracy(logits, labels) == pytest.approx(ref)
    metric = ClassificationAccuracy()
    for _ in range(2):
        for s in range(0, 200, 64):
            metric.update(logits[s : s + 64], labels[s : s + 64])
        assert metric.compute() == pytest.approx(ref)
        metric.reset()


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), r"shape \(B, C\)"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), r"shape \(4,\), got \(5,\)"),
        (torch.randn(4, 3), torch.zeros(4), "integer"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), r"\[0, 3\)"),
        (torch.full((2, 3), float("nan")), torch.tensor([0, 1]), "finite"),
    ],
)
def test_bad_inputs(logits, labels, message):
    with pytest.raises(InvalidInputError, match=message):
        topk_accuracy(logits, labels)
