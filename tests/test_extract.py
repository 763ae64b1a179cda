"""headreg.engine.extract / evaluate and headreg.plotting, in one process on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import headreg
from headreg.data import create_dataset, create_loader, resolve_transform
from headreg.engine.evaluate import (
    classification_accuracy,
    combine_query_gallery,
    evaluate_embeddings,
    evaluate_model,
    parse_metric_names,
)
from headreg.engine.extract import extract_dataset, extract_embeddings, gather_extraction, resolve_precision
from headreg.errors import InvalidInputError, InvalidValueError
from headreg.metrics import topk_accuracy
from headreg.plotting import project_2d, save_embedding_plot


@pytest.fixture(scope="module")
def model() -> headreg.HeadModel:
    torch.manual_seed(0)
    return headreg.create_model("lenetpp", head="arcface", num_classes=10, embedding_dim=3).eval()


@pytest.fixture(scope="module")
def fake():
    return create_dataset("fake", "test", num_samples=90)


def _reference(model: torch.nn.Module, fake, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and logits of the samples ``idx``, computed in one batch the plain way."""
    import timm.data

    tf = resolve_transform(timm.data.resolve_data_config(model=model), fake, train=False)
    with torch.no_grad():
        x = tf(fake.images[idx])
        emb = model.embed(x)
        return emb, model.head(emb)


def test_extract_matches_plain_forward_in_dataset_order(model, fake) -> None:
    out = extract_dataset(model, fake, device="cpu", batch_size=32, limit=70, progress=False)
    assert out.embeddings.shape == (70, 3) and out.embeddings.dtype == torch.float32
    assert out.images == 70 and out.seconds > 0 and out.images_per_second > 0
    idx = out.indices
    assert idx is not None and torch.equal(idx, idx.sort().values) and idx.unique().numel() == 70
    assert torch.equal(out.labels, fake.targets[idx])
    emb, logits = _reference(model, fake, idx)
    torch.testing.assert_close(out.embeddings, emb, rtol=1e-4, atol=1e-5)
    assert out.label_rank is not None and out.label_rank.shape == (70,)
    assert torch.equal(out.label_rank == 0, logits.argmax(1) == out.labels)
    # the same numbers as the metrics layer's accuracy computed from the full logits
    ours = classification_accuracy(out.label_rank)
    assert ours == pytest.approx(topk_accuracy(logits, out.labels, top_k=(1, 5)))
    assert out.precision == "fp32" and not out.channels_last


def test_amp_on_cpu_is_bf16_channels_last_and_close(model, fake) -> None:
    model.train()
    out = extract_dataset(model, fake, device="cpu", batch_size=64, amp=True, progress=False)
    assert model.training, "the caller's training mode must be restored"
    model.eval()
    assert out.precision == "bf16" and out.channels_last
    emb, _ = _reference(model, fake, out.indices)
    cos = F.cosine_similarity(out.embeddings, emb, dim=1)
    assert float(cos.min()) > 0.98  # bf16 rounding, not a different model


def test_resolve_precision() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(cpu, None) == (False, False)
    assert resolve_precision(cuda, None) == (True, True)
    assert resolve_precision(cpu, True) == (True, True)
    assert resolve_precision(cuda, False) == (False, False)


def test_headless_and_plain_timm_models(fake) -> None:
    import timm

    headless = headreg.create_model("lenetpp", embedding_dim=4)
    out = extract_dataset(headless, fake, device="cpu", batch_size=50, progress=False)
    assert out.label_rank is None and out.embeddings.shape == (90, 4)
    bare = timm.create_model("lenetpp", num_classes=0, embed_dim=4).eval()
    batches = [(torch.randn(5, 1, 28, 28), torch.arange(5))]
    out = extract_embeddings(bare, batches, device="cpu", progress=False)
    with torch.no_grad():
        ref = bare.forward_head(bare.forward_features(batches[0][0]), pre_logits=True)
    torch.testing.assert_close(out.embeddings, ref)
    assert out.indices is None and gather_extraction(out) is out


def test_empty_loader_is_an_error(model) -> None:
    with pytest.raises(InvalidValueError, match="no batch"):
        extract_embeddings(model, [], device="cpu", progress=False)


def test_explicit_loader_and_transform(model, fake) -> None:
    import timm.data

    loader = create_loader(fake, batch_size=7, shuffle=False, limit=20)
    tf = resolve_transform(timm.data.resolve_data_config(model=model), fake, train=False)
    out = extract_embeddings(model, loader, device="cpu", transform=tf, progress=False, with_predictions=False)
    assert out.embeddings.shape == (20, 3) and out.label_rank is None
    assert torch.equal(out.labels, fake.targets[out.indices])


# ------------------------------------------------------------------ evaluate_embeddings


def _clustered(n: int = 60, d: int = 8, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g) * 3
    return centres[labels] + torch.randn(n, d, generator=g), labels


def _p_at_1(q, ql, g, gl, exclude_self: bool) -> float:
    sim = F.normalize(q.double(), dim=1) @ F.normalize(g.double(), dim=1).T
    if exclude_self:
        sim.fill_diagonal_(-float("inf"))
    return float((gl[sim.argmax(1)] == ql).double().mean())


def test_leave_one_out_and_query_gallery_precision_at_1() -> None:
    emb, lab = _clustered()
    emb[::7] += torch.randn(emb[::7].shape) * 4  # some errors, so the number is not trivially 1
    m, warnings = evaluate_embeddings(emb, lab, metrics="retrieval")
    assert warnings == []
    assert m["precision_at_1"] == pytest.approx(_p_at_1(emb, lab, emb, lab, True))
    q, g = emb[:20], emb[20:]
    e2, l2, isq, isg = combine_query_gallery(q, lab[:20], g, lab[20:])
    m2, _ = evaluate_embeddings(e2, l2, is_query=isq, is_gallery=isg, metrics=["retrieval"])
    assert m2["num_queries"] == 20 and m2["num_gallery"] == 40
    assert m2["precision_at_1"] == pytest.approx(_p_at_1(q, lab[:20], g, lab[20:], False))


def test_query_label_absent_from_gallery_warns_not_crashes() -> None:
    emb, lab = _clustered()
    q_lab = lab[:10].clone()
    q_lab[0] = 99
    e, lb, isq, isg = combine_query_gallery(emb[:10], q_lab, emb[10:], lab[10:])
    m, warnings = evaluate_embeddings(e, lb, is_query=isq, is_gallery=isg, metrics="retrieval")
    assert len(warnings) == 1 and "1 of 10 queries" in warnings[0] and "label 99" in warnings[0]
    assert m["num_queries_without_positive"] == 1


@pytest.mark.parametrize(
    ("emb", "lab", "match"),
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.tensor([0, 0]), "finite.*row 0"),
        (torch.ones(1, 3), torch.tensor([0]), "at least 2 samples, got 1"),
        (torch.ones(3, 2), torch.tensor([0.0, 1.0, 1.0]), "must be an integer tensor, got dtype torch.float32"),
        (torch.ones(3, 2), torch.tensor([0, 1]), r"shape \(3,\), got \(2,\)"),
        (torch.ones(3, 2, dtype=torch.long), torch.tensor([0, 1, 1]), "must be a floating-point tensor"),
        (torch.ones(0, 2), torch.zeros(0, dtype=torch.long), "must not be empty"),
        (torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), "no query has another sample of its class"),
    ],
)
def test_bad_embeddings_are_clear_errors(emb, lab, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        evaluate_embeddings(emb, lab, metrics="retrieval")


def test_bad_options() -> None:
    emb, lab = _clustered()
    with pytest.raises(InvalidInputError, match="must have the query width D"):
        combine_query_gallery(emb, lab, emb[:, :3], lab)
    with pytest.raises(InvalidValueError, match="needs head predictions"):
        evaluate_embeddings(emb, lab, metrics="classification")
    with pytest.raises(InvalidValueError, match="subset of retrieval"):
        parse_metric_names("retrieval,acuracy")
    with pytest.raises(InvalidValueError, match="knn must be"):
        evaluate_embeddings(emb, lab, metrics="retrieval", knn="annoy")
    with pytest.raises(InvalidInputError, match="is_query selects no sample"):
        evaluate_embeddings(
            emb, lab, is_query=torch.zeros(60, dtype=torch.bool), is_gallery=torch.ones(60, dtype=torch.bool)
        )


def test_one_topk_definition_ties_count_as_hits(model, fake) -> None:
    import copy

    from headreg.metrics.classification import label_rank

    # Zero class weights: the head scores every class alike, so every label ties for first place.
    tied = copy.deepcopy(model)
    with torch.no_grad():
        tied.head.weight.zero_()
    out = extract_dataset(tied, fake, device="cpu", batch_size=32, progress=False)
    assert torch.equal(out.label_rank, torch.zeros(90, dtype=torch.long))
    logits = torch.zeros(90, 10)
    assert torch.equal(label_rank(logits, out.labels), out.label_rank)
    both = {"top1_accuracy": 1.0, "top5_accuracy": 1.0}
    assert classification_accuracy(out.label_rank) == topk_accuracy(logits, out.labels) == both
    # A label beyond the head's classes is a miss for every k up to C; no ranks at all give NaN.
    assert label_rank(torch.zeros(2, 3), torch.tensor([0, 5])).tolist() == [0, 3]
    assert all(v != v for v in classification_accuracy(torch.zeros(0, dtype=torch.long)).values())


def test_classification_accuracy_reference() -> None:
    rank = torch.tensor([0, 4, 5, 9])
    assert classification_accuracy(rank) == {"top1_accuracy": 0.25, "top5_accuracy": 0.5}
    emb, lab = _clustered(n=4, classes=1)
    m, _ = evaluate_embeddings(emb, lab, label_rank=rank, metrics="classification")
    assert m == {"top1_accuracy": 0.25, "top5_accuracy": 0.5}
    # under query/gallery only the queries count
    m, _ = evaluate_embeddings(
        emb,
        lab,
        label_rank=rank,
        metrics="classification",
        is_query=torch.tensor([1, 1, 0, 0]).bool(),
        is_gallery=torch.tensor([0, 0, 1, 1]).bool(),
    )
    assert m == {"top1_accuracy": 0.5, "top5_accuracy": 1.0}


def test_labels_outside_the_head_are_misses_and_warned(model) -> None:
    ds = create_dataset("fake", "test", num_samples=30, num_classes=12)
    r = evaluate_model(model, ds, device="cpu", metrics="classification", progress=False)
    outside = ds.targets >= 10
    assert bool((r.label_rank[r.labels >= 10] == 10).all()) and outside.any()
    assert any("outside the head's 10 classes" in w for w in r.warnings)


def test_evaluate_model_query_gallery(model) -> None:
    q = create_dataset("fake", "test", num_samples=40)
    g = create_dataset("fake", "train", num_samples=60)
    r = evaluate_model(model, q, g, device="cpu", metrics="retrieval,classification", progress=False)
    assert r.info["protocol"] == "query/gallery" and r.info["num_queries"] == 40 and r.info["num_gallery"] == 60
    assert r.is_query is not None and int(r.is_query.sum()) == 40 and not bool((r.is_query & r.is_gallery).any())
    assert torch.equal(r.labels, torch.cat([q.targets, g.targets]))
    assert 0.0 <= r.metrics["top1_accuracy"] <= 1.0 and r.to_dict()["info"]["world_size"] == 1


# ------------------------------------------------------------------ plotting


def test_project_2d_pca_and_identity() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([10.0, 0.1, 0.1, 3.0, 0.1])
    pts, axis = project_2d(x)
    assert pts.shape == (200, 2) and axis.startswith("PCA of 5-D")
    # the first component follows the widest axis (coordinate 0), the second coordinate 3
    assert abs(float(torch.corrcoef(torch.stack([pts[:, 0], x[:, 0]]))[0, 1])) > 0.99
    assert abs(float(torch.corrcoef(torch.stack([pts[:, 1], x[:, 3]]))[0, 1])) > 0.99
    two = torch.randn(10, 2)
    same, axis2 = project_2d(two)
    assert axis2 == "embedding" and torch.equal(same, two)


def test_save_embedding_plot(tmp_path) -> None:
    emb, lab = _clustered(n=50, d=6)
    path = save_embedding_plot(tmp_path / "sub" / "p.png", emb, lab, "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InvalidInputError, match="labels to plot"):
        save_embedding_plot(tmp_path / "q.png", emb, lab[:3], "t")
