"""k-means clustering metrics: NMI/AMI against scikit-learn on the same clusters."""

from __future__ import annotations

import pytest
import torch

from headreg.errors import InvalidInputError, InvalidValueError
from headreg.metrics import ClusteringMetrics
from headreg.metrics.clustering import clustering_metrics, kmeans

sk = pytest.importorskip("sklearn.metrics")


def blobs(n, c, d, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=gen) * 3
    y = torch.randint(0, c, (n,), generator=gen)
    return centers[y] + noise * torch.randn(n, d, generator=gen), y


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x, y = blobs(300, 4, 5, 0.1, seed=0)
    assign, centers = kmeans(x, 4, seed=1)
    assert sk.adjusted_rand_score(y.numpy(), assign.numpy()) == pytest.approx(1.0)
    # Every point sits at its nearest centre (a Lloyd fixed point), checked by brute force.
    d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    assert torch.equal(d.argmin(1), assign)
    assert torch.equal(kmeans(x, 4, seed=1)[0], assign)


@pytest.mark.parametrize("seed", [0, 1])
def test_nmi_ami_match_sklearn(seed, monkeypatch):
    x, y = blobs(400, 6, 8, 2.5, seed=seed)
    import headreg.metrics.clustering as cl

    seen = {}
    real = cl.kmeans

    def spy(*args, **kwargs):
        seen["assign"] = real(*args, **kwargs)[0]
        return seen["assign"], None

    monkeypatch.setattr(cl, "kmeans", spy)
    out = clustering_metrics(x, y, seed=seed)
    a, t = seen["assign"].numpy(), y.numpy()
    assert out["nmi"] == pytest.approx(sk.normalized_mutual_info_score(t, a), abs=1e-5)
    assert out["ami"] == pytest.approx(sk.adjusted_mutual_info_score(t, a), abs=1e-5)
    assert out["num_clusters"] == 6


def test_metric_class_matches_function():
    x, y = blobs(120, 3, 4, 1.0, seed=2)
    metric = ClusteringMetrics(seed=0)
    for _ in range(2):
        for s in range(0, 120, 50):
            metric.update(x[s : s + 50], y[s : s + 50])
        assert metric.compute() == clustering_metrics(x, y, seed=0)
        metric.reset()


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="at least 2 rows"):
        clustering_metrics(torch.randn(1, 3), torch.tensor([0]))
    with pytest.raises(InvalidInputError, match="integer"):
        clustering_metrics(torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(InvalidValueError, match="k must be in"):
        kmeans(torch.randn(4, 3), 5)
