"""Retrieval metrics against hand-worked cases, a float64 brute force written here, and PML."""

from __future__ import annotations

import math

import pytest
import torch

from headreg.errors import InvalidInputError, InvalidValueError
from headreg.metrics import RetrievalMetrics, _knn
from headreg.metrics.retrieval import retrieval_metrics, retrieval_with_masks


def brute_force(q, ql, g, gl, self_index, recall_k=(1, 2, 4, 8), knn_k=5):
    """Float64 reference: full sort, ties by lower gallery index, self excluded."""
    q = torch.nn.functional.normalize(q.double(), dim=1)
    g = torch.nn.functional.normalize(g.double(), dim=1)
    sums = {"precision_at_1": 0.0, "r_precision": 0.0, "mean_average_precision_at_r": 0.0, "knn_accuracy": 0.0}
    sums.update({f"recall_at_{k}": 0.0 for k in recall_k})
    kept = 0
    for a in range(q.shape[0]):
        items = [(-float(q[a] @ g[b]), b) for b in range(g.shape[0]) if b != self_index[a]]
        items.sort()
        labels = [int(gl[b]) for _, b in items]
        rel = [lab == int(ql[a]) for lab in labels]
        r = sum(rel)
        if r == 0:
            continue
        kept += 1
        sums["precision_at_1"] += rel[0]
        sums["r_precision"] += sum(rel[:r]) / r
        hits, ap = 0, 0.0
        for i in range(r):
            if rel[i]:
                hits += 1
                ap += hits / (i + 1)
        sums["mean_average_precision_at_r"] += ap / r
        for k in recall_k:
            sums[f"recall_at_{k}"] += any(rel[:k])
        top = labels[:knn_k]
        counts = {lab: top.count(lab) for lab in top}
        best = max(counts.values())
        pred = next(lab for lab in top if counts[lab] == best)  # nearest among the tied labels
        sums["knn_accuracy"] += pred == int(ql[a])
    return {k: v / kept for k, v in sums.items()}, q.shape[0] - kept


def clustered(n, c, d, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    return centers[y] + noise * torch.randn(n, d, generator=gen), y


def assert_close(ours, ref, tol=1e-9):
    for k, v in ref.items():
        assert math.isclose(ours[k], v, abs_tol=tol), (k, ours[k], v)


def test_hand_worked_case():
    # Query 0 (label 0) ranks: item1 (0.99, label 0), item2 (0.6, label 1), item3 (0.0, label 0).
    emb = torch.tensor([[1.0, 0.0], [0.99, math.sqrt(1 - 0.99**2)], [0.6, 0.8], [0.0, 1.0]])
    lab = torch.tensor([0, 0, 1, 0])
    q, ql = emb[:1], lab[:1]
    out = retrieval_metrics(q, ql, emb, lab, query_self_index=torch.tensor([0]), recall_k=(1, 2), knn_k=3)
    # R = 2; top-2 = [item1 (rel), item2 (not)]: R-precision 1/2; AP@R = (1/1) / 2.
    assert out["r_precision"] == pytest.approx(0.5)
    assert out["mean_average_precision_at_r"] == pytest.approx(0.5)
    assert out["precision_at_1"] == 1.0 and out["recall_at_2"] == 1.0
    assert out["knn_accuracy"] == 1.0  # labels 0, 1, 0 -> 0
    assert out["num_queries"] == 1 and out["num_queries_without_positive"] == 0


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_leave_one_out_matches_brute_force(chunk_size):
    x, y = clustered(150, 6, 8, 1.2, seed=1)
    y[0] = 99  # a class of one: excluded and counted
    ours = retrieval_metrics(x, y, chunk_size=chunk_size, recall_k=(1, 3, 8), knn_k=4)
    ref, without = brute_force(x, y, x, y, list(range(150)), recall_k=(1, 3, 8), knn_k=4)
    assert_close(ours, ref)
    assert ours["num_queries_without_positive"] == without == 1
    assert ours["num_queries"] == 150


def test_query_gallery_matches_brute_force():
    x, y = clustered(260, 5, 6, 1.0, seed=2)
    q, ql, g, gl = x[:60], y[:60].clone(), x[60:], y[60:]
    ql[:3] = 77  # labels absent from the gallery
    ours = retrieval_metrics(q, ql, g, gl, chunk_size=13)
    ref, without = brute_force(q, ql, g, gl, [-1] * 60)
    assert_close(ours, ref)
    assert ours["num_queries_without_positive"] == without == 3


def test_sampled_threshold_path_and_fallback(monkeypatch):
    # Large enough gallery for the sampled thresholds; then force every row onto the fallback.
    x, y = clustered(4200, 20, 8, 1.5, seed=3)
    q, ql = x[:90], y[:90]
    ref, _ = brute_force(q, ql, x, y, list(range(90)))
    stats: dict[str, float] = {}
    sampled = retrieval_with_masks(x, y, query_mask=torch.arange(4200) < 90, chunk_size=37, stats=stats)
    assert_close(sampled, ref)
    monkeypatch.setattr(_knn, "_SAMPLE_Z", -20.0)  # thresholds far too high: every row must fall back
    stats = {}
    forced = retrieval_with_masks(x, y, query_mask=torch.arange(4200) < 90, chunk_size=37, stats=stats)
    assert stats["fallback_rows"] == 90
    assert_close(forced, ref)
    # The fallback recomputes rows in batches of _FALLBACK_BYTES; rows must keep their identity
    # across batches, on the numpy path and on the torch path.
    monkeypatch.setattr(_knn, "_FALLBACK_BYTES", 4 * 4200 * 7)
    batched = retrieval_with_masks(x, y, query_mask=torch.arange(4200) < 90, chunk_size=37)
    assert_close(batched, ref)
    monkeypatch.setattr(_knn, "_numpy_ok", lambda t: False)
    assert_close(retrieval_with_masks(x, y, query_mask=torch.arange(4200) < 90, chunk_size=37), ref)


def test_ties_rank_lower_gallery_index_first():
    # Bit-identical duplicates: the order among them decides precision@1 and AP.
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gl = torch.tensor([5, 1, 0, 0, 0])
    q, ql = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    out = retrieval_metrics(q, ql, g, gl, recall_k=(1,), knn_k=1)
    # Ranking: 1 (label 1), 2 (0), 3 (0), then 0 and 4 (cos 0). R = 3: hits at ranks 2, 3.
    assert out["precision_at_1"] == 0.0
    assert out["r_precision"] == pytest.approx(2 / 3)
    assert out["mean_average_precision_at_r"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    ref, _ = brute_force(q, ql, g, gl, [-1], recall_k=(1,), knn_k=1)
    assert_close(out, ref)


def test_self_never_retrieved_even_with_duplicates():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    lab = torch.tensor([0, 1, 1, 0])
    out = retrieval_metrics(emb, lab, recall_k=(1,), knn_k=1)
    # Every query's only identical neighbour has the other label.
    assert out["precision_at_1"] == 0.0


def test_faiss_backend_matches_torch():
    pytest.importorskip("faiss")
    x, y = clustered(300, 6, 8, 1.0, seed=4)
    a = retrieval_metrics(x, y)
    b = retrieval_metrics(x, y, knn_backend="faiss")
    assert_close(b, a, tol=1e-6)


@pytest.mark.parametrize("loo", [True, False])
def test_against_pml_accuracy_calculator(loo):
    pytest.importorskip("faiss")
    ac_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = clustered(1500, 12, 16, 1.5, seed=5)
    xn = torch.nn.functional.normalize(x, dim=1)
    calc = ac_mod.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    if loo:
        ref = calc.get_accuracy(xn, y)
        ours = retrieval_metrics(x, y, chunk_size=97)
    else:
        ref = calc.get_accuracy(xn[:400], y[:400], xn[400:], y[400:], ref_includes_query=False)
        ours = retrieval_metrics(x[:400], y[:400], x[400:], y[400:], chunk_size=97)
    assert_close(ours, ref, tol=1e-6)


def test_metric_class_batches_reset_and_masks():
    x, y = clustered(120, 4, 6, 1.0, seed=6)
    metric = RetrievalMetrics(recall_k=(1, 4), chunk_size=16)
    for _ in range(2):  # the second round checks that reset() really empties the state
        for s in range(0, 120, 25):
            metric.update(x[s : s + 25], y[s : s + 25])
        assert metric.compute() == retrieval_metrics(x, y, recall_k=(1, 4), chunk_size=16)
        metric.reset()
    isq = torch.arange(120) < 40
    metric.update(x, y, is_query=isq, is_gallery=~isq)
    expected = retrieval_metrics(x[:40], y[:40], x[40:], y[40:], recall_k=(1, 4))
    assert_close(metric.compute(), expected, tol=1e-12)  # chunking changes only the float summation order


def test_overlapping_masks_exclude_self():
    x, y = clustered(80, 4, 6, 1.0, seed=7)
    qm = torch.arange(80) < 50
    gm = torch.arange(80) >= 20  # queries 20..49 are also in the gallery
    ours = retrieval_with_masks(x, y, query_mask=qm, gallery_mask=gm)
    self_index = [i - 20 if i >= 20 else -1 for i in range(50)]
    ref, _ = brute_force(x[:50], y[:50], x[20:], y[20:], self_index)
    assert_close(ours, ref)


def test_no_query_with_positive_gives_nan_and_counts():
    out = retrieval_metrics(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert math.isnan(out["precision_at_1"]) and out["num_queries_without_positive"] == 3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: retrieval_metrics(torch.randn(1, 4), torch.tensor([0])), "at least 2 rows"),
        (lambda: retrieval_metrics(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)), "must not be empty"),
        (lambda: retrieval_metrics(torch.randn(5, 4), torch.zeros(5)), "integer"),
        (
            lambda: retrieval_metrics(torch.randn(5, 4), torch.zeros(5, 1, dtype=torch.long)),
            r"shape \(5,\), got \(5, 1\)",
        ),
        (lambda: retrieval_metrics(torch.randn(5), torch.zeros(5, dtype=torch.long)), r"shape \(N, D\)"),
        (
            lambda: retrieval_metrics(
                torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
            ),
            "width D=4",
        ),
        (
            lambda: retrieval_metrics(
                torch.tensor([[1.0, float("nan")], [1.0, 2.0], [float("inf"), 0]]), torch.zeros(3)
            ),
            "2 of 3 rows",
        ),
        (lambda: retrieval_metrics(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), recall_k=(0,)), "recall_k"),
    ],
)
def test_bad_input_raises_clear_errors(call, message):
    with pytest.raises(InvalidInputError if "recall_k" not in message else InvalidValueError, match=message):
        call()


def test_unknown_backend_and_missing_faiss(monkeypatch):
    x, y = clustered(20, 2, 4, 1.0, seed=8)
    with pytest.raises(InvalidValueError, match="knn_backend"):
        retrieval_metrics(x, y, knn_backend="annoy")
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(InvalidValueError, match="pip install faiss-cpu"):
        retrieval_metrics(x, y, knn_backend="faiss")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, y = clustered(5000, 20, 16, 1.5, seed=9)
    assert_close(retrieval_metrics(x, y, device="cuda"), retrieval_metrics(x, y), tol=1e-6)


def _collect(chunks, rows, width):
    out = torch.full((rows, width), -1, dtype=torch.long)
    for start, nbr in chunks:
        out[start : start + nbr.shape[0], : nbr.shape[1]] = nbr
    return out


def test_numpy_and_torch_paths_agree(monkeypatch):
    # Sampled thresholds, a last tile shorter than the others (4200 items, tiles of 512), a last
    # chunk shorter than the others, grouped gallery: the CPU numpy path and the plain torch path
    # (used on GPUs) must return the same neighbours.
    x, y = clustered(4200, 20, 8, 1.5, seed=10)
    x = torch.nn.functional.normalize(x, dim=1)
    k = torch.bincount(y)[y[:300]].clamp(min=5)
    args = (x[:300], x, k, torch.arange(300))
    kwargs = {"chunk_size": 64, "tile_size": 512, "gallery_groups": y}
    fast = _collect(_knn.iter_ranked_neighbours(*args, **kwargs), 300, int(k.max()))
    monkeypatch.setattr(_knn, "_numpy_ok", lambda t: False)
    plain = _collect(_knn.iter_ranked_neighbours(*args, **kwargs), 300, int(k.max()))
    assert torch.equal(fast, plain)
    assert bool(((fast >= 0).sum(1) == k).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("fallback", [False, True])
def test_exact_neighbours_with_many_ties(dtype, grouped, fallback, monkeypatch):
    if fallback:
        monkeypatch.setattr(_knn, "_SAMPLE_Z", -20.0)  # every row recomputed at its exact threshold
    # Small integer vectors: every dot product is exact, so the reference order is exact and
    # ties (bit-identical similarities) are everywhere; they must rank by lower gallery index.
    gen = torch.Generator().manual_seed(11)
    g = torch.randint(0, 3, (5000, 4), generator=gen).to(dtype)
    labels = torch.randint(0, 7, (5000,), generator=gen)
    q = g[:50]
    k = torch.randint(1, 400, (50,), generator=gen)
    nbrs = _collect(
        _knn.iter_ranked_neighbours(
            q, g, k, torch.arange(50), chunk_size=16, gallery_groups=labels if grouped else None
        ),
        50,
        int(k.max()),
    )
    sims = (q.double() @ g.double().T).numpy()
    for r in range(50):
        order = [b for b in sorted(range(5000), key=lambda b: (-sims[r, b], b)) if b != r][: int(k[r])]
        assert nbrs[r, : int(k[r])].tolist() == order
        assert bool((nbrs[r, int(k[r]) :] == -1).all())


def test_metric_arithmetic_numpy_and_torch_paths_agree(monkeypatch):
    # The per-chunk sums run in numpy on a CPU and in torch elsewhere; both must give the same numbers.
    from headreg.metrics import _retrieval_sums as retrieval_module

    x, y = clustered(700, 9, 6, 1.5, seed=12)
    ref, _ = brute_force(x, y, x, y, list(range(700)), recall_k=(1, 4), knn_k=3)
    fast = retrieval_metrics(x, y, recall_k=(1, 4), knn_k=3, chunk_size=64)
    monkeypatch.setattr(retrieval_module, "_numpy_path", lambda t: False)
    plain = retrieval_metrics(x, y, recall_k=(1, 4), knn_k=3, chunk_size=64)
    assert_close(fast, ref)
    assert_close(plain, ref)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def torch_threads(request):
    """One torch thread (tiles scanned inline) and two (tiles scanned by two worker threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("fallback", [False, True])
def test_symmetric_leave_one_out_scan_matches_the_query_scan(fallback, torch_threads, monkeypatch):
    # Leave-one-out on a CPU scans each tile above the diagonal once, for its rows and its columns.
    # It must return exactly what the per-query scan returns: small integer vectors make every
    # similarity exact and ties everywhere; 4,700 items in blocks of 96 leave short last blocks in
    # both the sample and the rest; items with k = 0 query nothing but remain neighbours.
    if fallback:
        monkeypatch.setattr(_knn, "_SAMPLE_Z", -20.0)  # every row recomputed at its exact threshold
    gen = torch.Generator().manual_seed(13)
    x = torch.randint(-2, 3, (4700, 5), generator=gen).float()
    x = x[x.norm(dim=1) > 0]
    labels = torch.randint(0, 30, (x.shape[0],), generator=gen)
    n = x.shape[0]
    k = torch.randint(1, 300, (n,), generator=gen)
    k[::7] = 0
    assert _knn.self_scan_applies(x, 96)
    stats: dict[str, float] = {}
    got = torch.full((n, int(k.max())), -1, dtype=torch.long)
    seen = torch.zeros(n, dtype=torch.long)
    for items, nbr in _knn.iter_self_neighbours(x, k, chunk_size=96, groups=labels, stats=stats):
        got[items, : nbr.shape[1]] = nbr
        seen[items] += 1
    assert torch.equal(seen, (k > 0).long())  # every querying item exactly once, the others never
    if fallback:  # (a row whose k-th value ties the sample's maximum needs none)
        assert stats["fallback_rows"] > 0.5 * int((k > 0).sum())
    queries = (k > 0).nonzero().squeeze(1)
    ref = _collect(
        _knn.iter_ranked_neighbours(x[queries], x, k[queries], queries, chunk_size=96, gallery_groups=labels),
        queries.numel(),
        int(k.max()),
    )
    assert torch.equal(got[queries], ref)
    sims = (x[:40].double() @ x.double().T).numpy()  # and against a brute-force order
    for r in range(40):
        if k[r]:
            order = [b for b in sorted(range(n), key=lambda b: (-sims[r, b], b)) if b != r][: int(k[r])]
            assert got[r, : int(k[r])].tolist() == order


def test_leave_one_out_metrics_through_the_symmetric_scan():
    x, y = clustered(4500, 12, 6, 1.5, seed=14)
    y[:3] = 99  # a class of... three; and one of one below: no positive, excluded
    y[3] = 100
    assert _knn.self_scan_applies(x)
    out = retrieval_metrics(x, y)
    # Against the per-query scan (checked against the brute force above and below); the two
    # compute some similarities in other tiles, so near-ties may swap (the PML tolerance).
    per_query = retrieval_with_masks(x, y, query_mask=torch.ones(4500, dtype=torch.bool))
    assert_close(out, per_query, tol=1e-6)
    assert out["num_queries_without_positive"] == per_query["num_queries_without_positive"] == 1
