"""The retrieval benchmarks' metrics against the references: pytorch-metric-learning's AccuracyCalculator and OML.

What ``headreg eval`` computes for ``cub200`` / ``sop`` (leave-one-out) and ``inshop`` / ``csv:PATH`` (query ->
gallery) goes through :func:`headreg.engine.evaluate.evaluate_embeddings`; it must equal PML on the same
embeddings to 1e-6, with PML's documented k settings: ``k="max_bin_count"`` for P@1, R-precision and MAP@R, and
for Recall@K a custom metric added to the calculator as PML's docs show (a ``calculate_*`` method plus
``requires_knn``) over PML's own k-NN labels. Per-category numbers follow OML's ``EmbeddingMetrics``: the rows of
the category's queries against the whole gallery, written here independently in float64 numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headreg.engine._roles import dataset_recall_k
from headreg.engine.evaluate import evaluate_embeddings

pytest.importorskip("faiss")  # PML's default k-NN
ac_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")

SOP_K = (1, 10, 100, 1000)
INSHOP_K = (1, 10, 20, 30, 40, 50)


def pml_calculator(ks: tuple[int, ...]) -> type:
    """AccuracyCalculator with one ``recall_at_{k}`` metric per k: at least one positive among the k nearest."""

    def make(k: int):
        def calculate(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            knn_labels, query_labels = ac_mod.try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
            if knn_labels is None:
                return 0.0
            hit = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
            return hit.double().mean().item()

        return calculate

    methods = {f"calculate_recall_at_{k}": make(k) for k in ks}
    extra = [f"recall_at_{k}" for k in ks]
    methods["requires_knn"] = lambda self: [*ac_mod.AccuracyCalculator.requires_knn(self), *extra]
    return type("RecallCalculator", (ac_mod.AccuracyCalculator,), methods)


def pml_reference(q, ql, g=None, gl=None, ks=(1, 2, 4, 8)) -> dict[str, float]:
    """PML's numbers: P@1, R-precision, MAP@R at k="max_bin_count"; Recall@K at k = max(ks)."""
    cpu = torch.device("cpu")
    norm = torch.nn.functional.normalize
    q, g = norm(q, dim=1), None if g is None else norm(g, dim=1)
    args = (q, ql) if g is None else (q, ql, g, gl, False)
    base = ac_mod.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count", device=cpu
    ).get_accuracy(*args)
    recall = pml_calculator(ks)(include=tuple(f"recall_at_{k}" for k in ks), k=max(ks), device=cpu).get_accuracy(*args)
    return {**base, **recall}


def assert_close(ours, ref, tol=1e-6):
    for key, value in ref.items():
        assert math.isclose(ours[key], value, abs_tol=tol), (key, ours[key], value)


def many_small_classes(n_classes, per_class, d, noise, seed, duplicates=0):
    """SOP's shape: many classes of 2..per_class images; ``duplicates`` rows repeat an earlier row of their class
    exactly (bit-identical similarities, ties inside a class)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, per_class + 1, (n_classes,), generator=gen)
    y = torch.repeat_interleave(torch.arange(n_classes), sizes)
    centers = torch.randn(n_classes, d, generator=gen)
    x = centers[y] + noise * torch.randn(y.numel(), d, generator=gen)
    if duplicates:
        starts = torch.cumsum(sizes, 0) - sizes
        for c in range(duplicates):
            x[starts[c] + 1] = x[starts[c]]
    return x, y


def test_sop_shaped_leave_one_out_equals_pml_with_ties():
    x, y = many_small_classes(300, 8, 16, 1.2, seed=1, duplicates=40)
    assert 1001 < x.shape[0] < 2000  # Recall@1000 is then neither trivially 1 nor the whole gallery
    ours, _ = evaluate_embeddings(x, y, metrics="retrieval", recall_k=SOP_K)
    ref = pml_reference(x, y, ks=SOP_K)
    assert_close(ours, ref)
    assert ours["recall_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-12)
    assert ours["recall_at_1000"] < 1.0


def test_cub_shaped_leave_one_out_equals_pml():
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(20).repeat_interleave(30)  # 20 test classes of 30 images
    x = torch.randn(20, 12, generator=gen)[y] + 1.5 * torch.randn(600, 12, generator=gen)
    ours, _ = evaluate_embeddings(x, y, metrics="retrieval", recall_k=(1, 2, 4, 8))
    assert_close(ours, pml_reference(x, y, ks=(1, 2, 4, 8)))


def test_inshop_shaped_query_gallery_equals_pml():
    # In-shop: queries and gallery disjoint, each item 1-3 queries and 1-4 gallery images; some queries lone.
    gen = torch.Generator().manual_seed(3)
    items = 150
    nq = torch.randint(1, 4, (items,), generator=gen)
    ng = torch.randint(0, 5, (items,), generator=gen)  # 0: the item's queries have no positive
    ql, gl = torch.repeat_interleave(torch.arange(items), nq), torch.repeat_interleave(torch.arange(items), ng)
    centers = torch.randn(items, 16, generator=gen)
    q = centers[ql] + 1.0 * torch.randn(ql.numel(), 16, generator=gen)
    g = centers[gl] + 1.0 * torch.randn(gl.numel(), 16, generator=gen)
    emb, lab = torch.cat([q, g]), torch.cat([ql, gl])
    is_query = torch.arange(emb.shape[0]) < q.shape[0]
    ours, warnings = evaluate_embeddings(
        emb, lab, is_query=is_query, is_gallery=~is_query, metrics="retrieval", recall_k=INSHOP_K
    )
    assert_close(ours, pml_reference(q, ql, g, gl, ks=INSHOP_K))
    lone = int((ng[ql] == 0).sum())
    assert ours["num_queries_without_positive"] == lone and str(lone) in warnings[0]


def test_dataset_recall_k_defaults():
    class Sop:
        recall_k = SOP_K

    assert dataset_recall_k(Sop()) == SOP_K
    assert dataset_recall_k(Sop(), (1, 5)) == (1, 5)
    assert dataset_recall_k(object()) == (1, 2, 4, 8)


def oml_per_category(q, ql, qcat, g, gl, ks):
    """OML's EmbeddingMetrics with categories: cmc@k over the rows of each category's queries (float64 numpy)."""
    qn = q.double().numpy()
    gn = g.double().numpy()
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    gn /= np.linalg.norm(gn, axis=1, keepdims=True)
    dist = np.sqrt(np.maximum(2 - 2 * qn @ gn.T, 0))  # OML's Euclidean distance matrix
    mask_gt = ql.numpy()[:, None] == gl.numpy()[None, :]
    out = {}
    for cat in np.unique(qcat):
        rows = qcat == cat
        order = np.argsort(dist[rows], axis=1, kind="stable")
        gt_sorted = np.take_along_axis(mask_gt[rows], order, axis=1)
        for k in ks:
            out[f"{cat}/recall_at_{k}"] = float((gt_sorted[:, :k].sum(1) > 0).mean())
    return out


def test_per_category_equals_oml_definition():
    gen = torch.Generator().manual_seed(4)
    items = 120
    ql = torch.arange(items).repeat_interleave(2)
    gl = torch.arange(items).repeat_interleave(3)  # every query has positives (OML's validity check)
    centers = torch.randn(items, 8, generator=gen)
    q = centers[ql] + 1.3 * torch.randn(ql.numel(), 8, generator=gen)
    g = centers[gl] + 1.3 * torch.randn(gl.numel(), 8, generator=gen)
    cats = np.array(["bags", "shoes", "tops"])[(torch.arange(items) % 3).numpy()]
    qcat, gcat = cats[ql.numpy()], cats[gl.numpy()]
    emb, lab = torch.cat([q, g]), torch.cat([ql, gl])
    is_query = torch.arange(emb.shape[0]) < q.shape[0]
    ks = (1, 2, 4, 8)
    ours, _ = evaluate_embeddings(
        emb, lab, is_query=is_query, is_gallery=~is_query, metrics="retrieval", recall_k=ks,
        categories=[*qcat.tolist(), *gcat.tolist()],
    )  # fmt: skip
    ref = oml_per_category(q, ql, qcat, g, gl, ks)
    assert_close(ours, ref, tol=1e-12)
    # The whole is the query-weighted mean of its categories, as OML's micro averaging.
    for k in ks:
        parts = sum(ours[f"{c}/recall_at_{k}"] * ours[f"{c}/num_queries"] for c in ("bags", "shoes", "tops"))
        assert parts / ours["num_queries"] == pytest.approx(ours[f"recall_at_{k}"], abs=1e-12)
    assert_close(
        {key.split("/", 1)[1]: v for key, v in ours.items() if key.startswith("shoes/")},
        pml_reference(q[qcat == "shoes"], ql[qcat == "shoes"], g, gl, ks=ks),
    )


def test_nmi_ami_equal_pml_given_the_same_clustering():
    # PML clusters with faiss k-means, headreg with its own (seeded k-means++): the clusterings differ by design.
    # Given headreg's clustering as PML's documented `kmeans_func`, PML's NMI and AMI must be headreg's.
    from headreg.metrics.clustering import kmeans

    gen = torch.Generator().manual_seed(5)
    y = torch.arange(25).repeat_interleave(12)
    x = torch.randn(25, 10, generator=gen)[y] + 1.4 * torch.randn(300, 10, generator=gen)
    ours, _ = evaluate_embeddings(x, y, metrics="clustering")

    def headreg_kmeans(query, num_clusters):
        return kmeans(torch.nn.functional.normalize(query, dim=1), num_clusters, seed=0)[0]

    calc = ac_mod.AccuracyCalculator(include=("NMI", "AMI"), kmeans_func=headreg_kmeans, device=torch.device("cpu"))
    ref = calc.get_accuracy(x, y)
    assert ours["num_clusters"] == 25
    assert_close(ours, {"nmi": ref["NMI"], "ami": ref["AMI"]})
