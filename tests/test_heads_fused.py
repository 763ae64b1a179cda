"""The fused margin cross-entropy (heads/_fused.py) against the unfused pipeline, in float64.

Loss, label rank and gradients (embeddings, class weights, bias, a learned or per-row scale) equal the
straightforward ``cosine → replace target → scale → F.cross_entropy`` to float64 rounding; gradcheck on
tiny shapes; class-sharded over 2 and 3 gloo processes (uneven blocks, Partial FC's row sampling) it
gives the single process's loss and gradients.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import headreg
from headreg.errors import HeadregError
from headreg.heads import head_fused_terms
from headreg.heads.functional import (
    FusedTerms,
    arcface_margin,
    combined_margin,
    cosface_margin,
    fused_margin_cross_entropy,
    margin_logits,
    normalize,
    sphereface_psi,
)
from headreg.metrics.classification import label_rank

B, D, C = 9, 6, 13

MARGINS = {
    "none": None,
    "arcface": lambda u: arcface_margin(u, 0.5),
    "arcface_easy": lambda u: arcface_margin(u, 0.5, easy_margin=True),
    "cosface": lambda u: cosface_margin(u, 0.35),
    "combined": lambda u: combined_margin(u, 1.2, 0.3, 0.2),
    "sphereface": lambda u: (5.0 * u + sphereface_psi(u, 4)) / 6.0,
}


def reference(x, weight, labels, psi, scale, bias=None, normalize_weight=True):
    """The straightforward pipeline, written here independently: every (B, C) step kept."""
    if normalize_weight:
        u = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    else:
        u = x @ weight.t() + (0 if bias is None else bias)
    s = scale.unsqueeze(1) if isinstance(scale, torch.Tensor) and scale.dim() == 1 else scale
    logits = u * s
    if psi is not None:
        u_y = u[torch.arange(len(labels)), labels]
        onehot = F.one_hot(labels, weight.shape[0]).bool()
        target = psi(u_y).unsqueeze(1) * s
        logits = torch.where(onehot, target, logits)
    plain = (u * s).detach()
    rank = (plain > plain[torch.arange(len(labels)), labels].unsqueeze(1)).sum(1)
    return F.cross_entropy(logits, labels), rank, logits


def _arc(u, m):
    theta = torch.acos(u.clamp(-1, 1))
    return torch.where(theta + m <= math.pi, torch.cos(theta + m), u - m * math.sin(m))


def _sphere_psi(u, m):
    theta = torch.acos(u.clamp(-1, 1))
    k = torch.floor(m * theta.detach() / math.pi).clamp(0, m - 1)
    return (-1.0) ** k * torch.cos(m * theta) - 2 * k


# name, options, (x, head) -> (psi, scale) of the reference; None: the linear softmax.
HEADS = {
    "softmax": ({}, None),
    "modified_softmax": ({}, lambda x, h: (None, x.norm(dim=1))),
    "normface": ({}, lambda x, h: (None, 16.0)),
    "normface_learned": ({"learn_scale": True, "scale": 12.0}, lambda x, h: (None, h.log_scale.exp())),
    "arcface": ({}, lambda x, h: (lambda u: _arc(u, 0.5), 64.0)),
    "cosface": ({}, lambda x, h: (lambda u: u - 0.35, 64.0)),
    "combined": ({}, lambda x, h: (lambda u: _arc(u, 0.3) - 0.2, 64.0)),
    "combined_m1": (
        {"m1": 1.3, "m2": 0.2, "m3": 0.1},
        lambda x, h: (lambda u: torch.cos(1.3 * torch.acos(u) + 0.2) - 0.1, 64.0),
    ),
    "sphereface": (
        {"base": 3.0, "lambda_min": 0.5},
        lambda x, h: (lambda u: (3 * u + _sphere_psi(u, 4)) / 4, x.norm(dim=1)),
    ),
}


def _data(seed=0, c=C):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).requires_grad_(True)
    w = (torch.randn(c, D, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    y = torch.randint(0, c, (B,), generator=g)
    y[0] = y[1]  # a class twice in the batch: the target corrections add up
    return x, w, y


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("scale_kind", ["float", "learned", "row"])
def test_equals_unfused_pipeline_float64(margin, scale_kind):
    x, w, y = _data()
    psi = MARGINS[margin]
    learned = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)

    def scale():
        return {"float": 7.5, "learned": learned, "row": x.norm(dim=1)}[scale_kind]

    inputs = [x, w] + ([learned] if scale_kind == "learned" else [])
    ref_loss, ref_rank, _ = reference(x, w, y, psi, scale())
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    out = fused_margin_cross_entropy(normalize(x), w, y, psi, scale(), with_rank=True)
    grads = torch.autograd.grad(out.loss, inputs)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(out.label_rank, ref_rank)
    assert torch.equal(out.top1, ref_rank == 0)


def test_linear_head_with_bias_equals_linear_cross_entropy():
    x, w, y = _data(1)
    b = torch.randn(C, dtype=torch.float64).requires_grad_(True)
    ref = F.cross_entropy(F.linear(x, w, b), y)
    ref_grads = torch.autograd.grad(ref, [x, w, b])
    out = fused_margin_cross_entropy(x, w, y, bias=b, normalize_weight=False, with_rank=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.loss, [x, w, b]), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    rank = reference(x, w, y, None, 1.0, b, False)[1]
    assert torch.equal(out.label_rank, rank) and torch.equal(out.top1, rank == 0)


def test_top1_counts_ties_as_hits():
    """A class whose weight equals the label's ties with it: still a top-1 hit, as label_rank counts it."""
    x, w, y = _data(10)
    with torch.no_grad():
        w[(y[3] + 1) % C] = w[y[3]]
        x[3] = w[y[3]]  # the label (and its twin) first
    out = fused_margin_cross_entropy(normalize(x), w, y, MARGINS["arcface"], 10.0, with_rank=True)
    assert out.top1[3] and out.label_rank[3] == 0
    assert torch.equal(out.top1, reference(x, w, y, None, 10.0)[1] == 0)


@pytest.mark.parametrize("case", list(HEADS))
def test_every_head_on_the_margin_path_equals_its_unfused_formula(case):
    """Each built-in head's training loss, gradients, label rank and (rebuilt) logits against the formula."""
    name, options = case.split("_")[0] if case.startswith(("normface_", "combined_")) else case, HEADS[case][0]
    x, w, y = _data(7)
    x.detach_().mul_(0.3).requires_grad_(True)  # away from cos = ±1, where the clamps differ
    head = headreg.create_head(name, D, C, **options).double().train()
    with torch.no_grad():
        head.weight.copy_(w)
    params = [p for p in head.parameters() if p.requires_grad]
    terms = HEADS[case][1]
    if terms is None:
        ref_loss, ref_rank, ref_logits = reference(x, head.weight, y, None, 1.0, head.bias, False)
    else:
        psi, scale = terms(x, head)
        ref_loss, ref_rank, ref_logits = reference(x, head.weight, y, psi, scale)
    ref_grads = torch.autograd.grad(ref_loss, [x, *params], retain_graph=True)
    out = head(x, y)
    # Rebuilt on demand, the logits are part of the graph, as the unfused pipeline's were.
    logits_grad = torch.autograd.grad(out.logits.sum(), x, retain_graph=True)
    torch.testing.assert_close(logits_grad, torch.autograd.grad(ref_logits.sum(), x))
    assert isinstance(head.fused_terms(x.detach()), FusedTerms)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.loss, [x, *params]), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert torch.equal(out.top1, ref_rank == 0)
    with torch.no_grad():
        assert torch.equal(out.top1, label_rank(head.eval()(x), y) == 0)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-12, atol=1e-12)


def test_logits_read_after_the_step_are_refused():
    head = headreg.create_head("arcface", D, C)
    x, _, y = _data(8)
    out = head(x.detach().float(), y)
    out.loss.backward()
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    with pytest.raises(HeadregError, match="after the head's weights changed"):
        out.logits  # noqa: B018


def test_sphereface_focal_loss_stays_unfused():
    head = headreg.create_head("sphereface", D, C, focal_gamma=2.0)
    x, _, y = _data(9)
    assert head.fused_terms(x.float()) is None
    out = head(x.float(), y)
    assert out.top1 is None and out.logits.shape == (B, C)


@pytest.mark.parametrize("margin", ["arcface", "combined", "sphereface", "none"])
def test_gradcheck(margin):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2, 2])
    psi = MARGINS[margin]
    assert torch.autograd.gradcheck(
        lambda a, b, c: fused_margin_cross_entropy(normalize(a), b, y, psi, c).loss, (x, w, s)
    )
    assert torch.autograd.gradcheck(
        lambda a, b: fused_margin_cross_entropy(normalize(a), b, y, psi, a.norm(dim=1)).loss, (x, w)
    )
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: fused_margin_cross_entropy(a, b, y, bias=c, normalize_weight=False).loss, (x, w, bias)
    )


def test_backward_twice_with_retain_graph():
    """Backward reads the buffer without changing it, so a retained graph gives the same gradient again."""
    x, w, y = _data(2)
    loss = fused_margin_cross_entropy(normalize(x), w, y, MARGINS["arcface"], 10.0).loss
    first = torch.autograd.grad(loss, [x, w], retain_graph=True)
    second = torch.autograd.grad(loss, [x, w])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_float32_close_to_unfused():
    x, w, y = _data(4)
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref, _, _ = reference(x32, w32, y, MARGINS["arcface"], 64.0)
    ref_grads = torch.autograd.grad(ref, [x32, w32])
    out = fused_margin_cross_entropy(normalize(x32), w32, y, MARGINS["arcface"], 64.0)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out.loss, [x32, w32]), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_index_keeps_a_subset_of_rows():
    """Partial FC's sampling: the softmax over the kept rows only, labels mapped to their positions."""
    x, w, y = _data(5)
    keep = torch.unique(torch.cat([y, torch.tensor([3, 7, 12])]))
    remap = torch.searchsorted(keep, y)
    ref, _, _ = reference(x, w[keep], remap, MARGINS["cosface"], 5.0)
    ref_grads = torch.autograd.grad(ref, [x, w])
    out = fused_margin_cross_entropy(normalize(x), w, y, MARGINS["cosface"], 5.0, index=keep)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.loss, [x, w]), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    """One rank: its uneven block of the classes, the whole batch, unsampled then sampled."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    x, w, y = _sharded_problem()
    bounds = [0, 4, 11, 17] if world == 3 else [0, 7, 17]  # uneven blocks
    lo, hi = bounds[rank], bounds[rank + 1]
    mine = y[(y >= lo) & (y < hi)] - lo  # Partial FC keeps every class in the batch, plus negatives
    sampled = torch.unique(torch.cat([mine, torch.tensor([hi - lo - 1])]))
    res = {}
    empty = [0, 17, 17] if world == 2 else [0, 9, 9, 17]  # the last rank, or the middle one, holds no class
    for name, index in (("full", None), ("sampled", sampled), ("empty", None)):
        if name == "empty":
            lo, hi = empty[rank], empty[rank + 1]
        xs = x.detach().clone().requires_grad_(True)
        ws = w.detach()[lo:hi].clone().requires_grad_(True)
        out = fused_margin_cross_entropy(
            normalize(xs),
            ws,
            y,
            MARGINS["arcface"],
            8.0,
            class_offset=lo,
            index=index,
            group=dist.group.WORLD,
            with_rank=True,
        )
        out.loss.backward()
        res[name] = {
            "loss": out.loss.item(),
            "rank": out.label_rank.tolist(),
            "top1": out.top1.tolist(),
            "grad_x": xs.grad.tolist(),
            "grad_w": ws.grad.tolist(),
            "lo": lo,
            "hi": hi,
            "kept": [] if index is None else (index + lo).tolist(),
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _sharded_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(17, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    return x, w, torch.randint(0, 17, (10,), generator=g)


def _run_ranks(tmp_path: Path, world: int) -> list[dict]:
    # Spawned, not forked: a fork of a process whose thread pools are running (as in the full suite) can deadlock.
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path / "store"), str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_over_gloo_equals_one_process(tmp_path, world):
    results = _run_ranks(tmp_path, world)
    x, w, y = _sharded_problem()
    psi = MARGINS["arcface"]
    ref, rank, _ = reference(x, w, y, psi, 8.0)
    ref.backward()
    # "empty": one rank holds no class at all (its block is (0, D)) and must still take part.
    for case in ("full", "empty"):
        for r in results:
            got = r[case]
            assert got["loss"] == pytest.approx(ref.item(), rel=1e-12)
            assert got["rank"] == rank.tolist() and got["top1"] == (rank == 0).tolist()
            grad_w = torch.tensor(got["grad_w"], dtype=torch.float64).reshape(-1, 6)
            torch.testing.assert_close(grad_w, w.grad[got["lo"] : got["hi"]], rtol=1e-10, atol=1e-12)
        # x's gradient is each rank's share: their sum is the whole (the all-gather's backward sums them).
        grad_x = sum(torch.tensor(r[case]["grad_x"], dtype=torch.float64) for r in results)
        torch.testing.assert_close(grad_x, x.grad, rtol=1e-10, atol=1e-12)
    # Partial FC's sampling: each rank keeps its batch classes and one more; the loss is the softmax over
    # the union of kept rows, and the rows not kept get a zero gradient.
    kept = torch.tensor(sorted(c for r in results for c in r["sampled"]["kept"]))
    xk = x.detach().clone().requires_grad_(True)
    wk = w.detach().clone().requires_grad_(True)
    ref_k, rank_k, _ = reference(xk, wk[kept], torch.searchsorted(kept, y), psi, 8.0)
    ref_k.backward()
    for r in results:
        got = r["sampled"]
        assert got["loss"] == pytest.approx(ref_k.item(), rel=1e-12)
        assert got["rank"] == rank_k.tolist() and got["top1"] == (rank_k == 0).tolist()
        torch.testing.assert_close(
            torch.tensor(got["grad_w"], dtype=torch.float64), wk.grad[got["lo"] : got["hi"]], rtol=1e-10, atol=1e-12
        )
    torch.testing.assert_close(
        sum(torch.tensor(r["sampled"]["grad_x"], dtype=torch.float64) for r in results), xk.grad, rtol=1e-10, atol=1e-12
    )


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    REGISTERED = headreg.list_heads()


@pytest.mark.parametrize("name", REGISTERED)
def test_a_head_offering_fused_terms_computes_their_cross_entropy(name):
    """Any registered head (plugins too) that declares fused_terms trains on exactly that loss."""
    head = headreg.create_head(name, D, C).double().eval()  # eval: no statistics move between the calls
    x, _, y = _data(11)
    terms = head_fused_terms(head, x)
    on_path = {"softmax", "modified_softmax", "normface", "sphereface", "arcface", "cosface", "combined", "adaface"}
    assert (terms is not None) == (name in on_path), name
    if terms is None:
        return
    bias = getattr(head, "bias", None)
    expected = F.cross_entropy(margin_logits(terms, head.weight, y, bias), y)
    torch.testing.assert_close(head(x, y).loss, expected, rtol=1e-12, atol=1e-12)
