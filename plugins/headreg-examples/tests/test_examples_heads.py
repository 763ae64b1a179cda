"""The example heads against float64 references written out here, element by element.

The references use only ``math`` on Python floats, none of headreg's or the plugin's
helpers, so a slip in the shared pipeline cannot hide in both.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

try:
    import headreg_examples  # noqa: F401
except ImportError:  # not pip-installed: test the source tree next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headreg.errors import InvalidInputError, InvalidValueError

from headreg_examples import AdaFaceHead, CurricularFaceHead, SubCenterArcFaceHead

HEADS = {"adaface": AdaFaceHead, "curricularface": CurricularFaceHead, "subcenter_arcface": SubCenterArcFaceHead}


# --------------------------------------------------------------------------- references


def ref_cosines(x: torch.Tensor, w: torch.Tensor) -> list[list[float]]:
    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    xs = [unit(r) for r in x.tolist()]
    ws = [unit(r) for r in w.tolist()]
    return [[sum(a * b for a, b in zip(xi, wj, strict=True)) for wj in ws] for xi in xs]


def ref_arcface_target(c: float, m: float) -> float:
    theta = math.acos(max(-1.0, min(1.0, c)))
    return math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)


def ref_ce(rows: list[list[float]], labels: list[int]) -> float:
    total = 0.0
    for row, y in zip(rows, labels, strict=True):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
    return total / len(rows)


def ref_adaface(x, w, labels, s, m, h, mu, sigma, eps=1e-3):
    cos = ref_cosines(x, w)
    rows = []
    for xi, ci, y in zip(x.tolist(), cos, labels, strict=True):
        norm = min(max(math.sqrt(sum(a * a for a in xi)), 1e-3), 100.0)
        z = min(max((norm - mu) / (sigma + eps) * h, -1.0), 1.0)
        g_angle, g_add = -m * z, m * z + m
        theta = math.acos(max(-1.0, min(1.0, ci[y])))
        row = [s * c for c in ci]
        row[y] = s * (math.cos(min(max(theta + g_angle, eps), math.pi - eps)) - g_add)
        rows.append(row)
    return rows


def ref_curricular(x, w, labels, s, m, t):
    rows = []
    for ci, y in zip(ref_cosines(x, w), labels, strict=True):
        target = ref_arcface_target(ci[y], m)
        row = [s * (c * (t + c) if c > target else c) for c in ci]
        row[y] = s * target
        rows.append(row)
    return rows


def ref_subcenter(x, w, labels, s, m, k):
    rows = []
    for ci in ref_cosines(x, w):
        rows.append([max(ci[j * k : (j + 1) * k]) for j in range(len(ci) // k)])
    if labels is None:
        return [[s * c for c in r] for r in rows]
    out = []
    for r, y in zip(rows, labels, strict=True):
        row = [s * c for c in r]
        row[y] = s * ref_arcface_target(r[y], m)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- helpers


def planar(angles_x: list[float], norms: list[float], angles_w: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D embeddings and weights at given angles, so θ is known exactly."""
    points = [[r * math.cos(a), r * math.sin(a)] for a, r in zip(angles_x, norms, strict=True)]
    x = torch.tensor(points, dtype=torch.float64)
    w = torch.tensor([[math.cos(a), math.sin(a)] for a in angles_w], dtype=torch.float64)
    return x, w


def assert_rows(actual: torch.Tensor, expected: list[list[float]], atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-9)


def make(name: str, d: int = 6, c: int = 5, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return HEADS[name](d, c, **options).double()


# Target angles θ_y that cover 0, π, both sides of the ArcFace fallback at θ = π − m, and the middle.
THETAS = [0.0, 1e-5, 0.3, 1.2, math.pi - 0.6, math.pi - 0.4, math.pi - 1e-5, math.pi]


# ------------------------------------------------------------------------------ AdaFace


@pytest.mark.parametrize("norms", [[1.0, 5.0, 9.0, 60.0, 0.5, 5.0, 30.0, 2.0]])
def test_adaface_matches_reference_across_angles_and_norms(norms):
    head = AdaFaceHead(2, 3, scale=64.0, margin=0.4, h=0.333).double().eval()
    head.norm_mean.fill_(5.0)
    head.norm_std.fill_(2.0)  # ẑ spans −1 … 1 (clipped) over these norms
    x, w = planar(THETAS, norms, [0.0, 2.0, -2.0])
    with torch.no_grad():
        head.weight.copy_(w)
    labels = [0] * len(THETAS)
    out = head(x, torch.tensor(labels))
    expected = ref_adaface(x, w, labels, 64.0, 0.4, 0.333, 5.0, 2.0)
    assert_rows(out.logits, expected, atol=1e-6)  # acos is clamped by 1 ulp inside the head
    assert out.loss.item() == pytest.approx(ref_ce(expected, labels), rel=1e-6, abs=1e-6)
    assert_rows(head(x), [[64.0 * c for c in r] for r in ref_cosines(x, w)])  # no margin without labels


def test_adaface_statistics_update_only_in_training():
    head = make("adaface")
    torch.manual_seed(1)
    x = torch.randn(7, 6, dtype=torch.float64) * torch.linspace(0.5, 30, 7, dtype=torch.float64).unsqueeze(1)
    labels = torch.randint(0, 5, (7,))
    norms = [min(max(n, 1e-3), 100.0) for n in x.norm(dim=1).tolist()]

    head.eval()
    head(x, labels)
    assert head.norm_mean.item() == 20.0 and head.norm_std.item() == 100.0

    head.train()
    head(x)  # no labels: no loss, no statistics
    assert head.norm_mean.item() == 20.0 and head.norm_std.item() == 100.0

    out = head(x, labels)
    mu = 0.01 * statistics.fmean(norms) + 0.99 * 20.0
    sigma = 0.01 * statistics.stdev(norms) + 0.99 * 100.0
    assert head.norm_mean.item() == pytest.approx(mu, rel=1e-12)
    assert head.norm_std.item() == pytest.approx(sigma, rel=1e-12)
    # the statistics are updated before this batch uses them
    expected = ref_adaface(x, head.weight.detach(), labels.tolist(), 64.0, 0.4, 0.333, mu, sigma)
    assert_rows(out.logits.detach(), expected, atol=1e-6)


def test_adaface_single_sample_batch_keeps_std():
    head = make("adaface").train()
    head(torch.randn(1, 6, dtype=torch.float64), torch.tensor([2]))
    assert head.norm_std.item() == 100.0
    assert head.norm_mean.item() != 20.0


# ------------------------------------------------------------------------ CurricularFace


@pytest.mark.parametrize("t", [0.0, 0.4])
def test_curricularface_matches_reference(t):
    head = CurricularFaceHead(2, 4, scale=64.0, margin=0.5).double().eval()
    head.t.fill_(t)
    # class 0 is the target; the others sit around the circle, so each sample has hard and easy negatives
    x, w = planar(THETAS, [3.0] * len(THETAS), [0.0, 0.9, 2.2, -2.8])
    with torch.no_grad():
        head.weight.copy_(w * 2.5)  # any weight norm: only directions count
    labels = [0] * len(THETAS)
    out = head(x, torch.tensor(labels))
    expected = ref_curricular(x, w, labels, 64.0, 0.5, t)
    assert_rows(out.logits, expected, atol=1e-6)
    assert out.loss.item() == pytest.approx(ref_ce(expected, labels), rel=1e-6, abs=1e-6)
    assert_rows(head(x), [[64.0 * c for c in r] for r in ref_cosines(x, w)], atol=1e-12)


def test_curricularface_fallback_beyond_pi():
    head = CurricularFaceHead(2, 2, margin=0.5).double().eval()
    theta = math.pi - 0.3  # θ + m > π
    x, w = planar([theta], [1.0], [0.0, math.pi / 2])
    with torch.no_grad():
        head.weight.copy_(w)
    logit = head(x, torch.tensor([0])).logits[0, 0].item()
    assert logit == pytest.approx(64.0 * (math.cos(theta) - 0.5 * math.sin(0.5)), abs=1e-9)
    assert logit < 64.0 * math.cos(theta)  # the margin still lowers the target


def test_curricularface_t_updates_only_in_training():
    head = make("curricularface")
    torch.manual_seed(2)
    x = torch.randn(6, 6, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,))
    cos_y = [r[y] for r, y in zip(ref_cosines(x, head.weight.detach()), labels.tolist(), strict=True)]

    head.eval()
    head(x, labels)
    assert head.t.item() == 0.0
    head.train()
    head(x)
    assert head.t.item() == 0.0
    out = head(x, labels)
    t1 = 0.01 * statistics.fmean(cos_y)
    assert head.t.item() == pytest.approx(t1, rel=1e-12)
    assert_rows(out.logits.detach(), ref_curricular(x, head.weight.detach(), labels.tolist(), 64.0, 0.5, t1), 1e-9)
    head(x, labels)
    assert head.t.item() == pytest.approx(0.01 * statistics.fmean(cos_y) + 0.99 * t1, rel=1e-12)


# --------------------------------------------------------------------- Sub-center ArcFace


def test_subcenter_matches_reference():
    k = 3
    head = SubCenterArcFaceHead(2, 3, scale=64.0, margin=0.5, k=k).double()
    # class 0's three sub-centres at 0, 2.5 and −2.5 rad: the nearest one decides θ_0
    angles_w = [0.0, 2.5, -2.5, 1.0, 1.1, 1.2, -1.0, 3.0, -1.4]
    x, w = planar(THETAS, [2.0] * len(THETAS), angles_w)
    with torch.no_grad():
        head.weight.copy_(w)
    labels = [0, 1, 2, 0, 0, 1, 2, 0]
    out = head(x, torch.tensor(labels))
    expected = ref_subcenter(x, w, labels, 64.0, 0.5, k)
    assert_rows(out.logits, expected, atol=1e-6)
    assert out.loss.item() == pytest.approx(ref_ce(expected, labels), rel=1e-6, abs=1e-6)
    assert_rows(head(x), ref_subcenter(x, w, None, 64.0, 0.5, k), atol=1e-12)


def test_subcenter_weight_is_class_major():
    head = SubCenterArcFaceHead(4, 3, k=2).double()
    assert head.weight.shape == (6, 4)
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[2 * 1 + 1] = x[0]  # sub-centre 1 of class 1
    assert head(x)[0].argmax().item() == 1
    assert head(x)[0, 1].item() == pytest.approx(64.0)


def test_subcenter_k1_is_arcface():
    from headreg.heads import ArcFaceHead

    torch.manual_seed(3)
    sub = SubCenterArcFaceHead(6, 5, k=1).double()
    arc = ArcFaceHead(6, 5).double()
    arc.load_state_dict({**arc.state_dict(), "weight": sub.weight.detach().clone()})
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 4, 2])
    torch.testing.assert_close(sub(x, y).logits, arc(x, y).logits)


def test_heads_describe_their_margin_to_headreg():
    # Ten class directions in the plane are at most 2π/10 apart; a head's suggested 2-D settings meet its bound.
    delta = 2 * math.pi / 10
    for cls in (CurricularFaceHead, SubCenterArcFaceHead):  # ArcFace's target: m < δ
        assert cls.angular is True
        assert cls.margin_feasibility({"margin": delta - 1e-3}, 2, 10) == []
        (line,) = cls.margin_feasibility({"margin": delta + 1e-3}, 2, 10)
        assert line.startswith("margin=") and "< δ = 0.628 rad" in line
        assert cls.margin_feasibility(dict(cls.settings_2d), 2, 10) == []
    # AdaFace at the mean feature norm (ẑ = 0) is CosFace: m < 1 − cos δ.
    bound = 1 - math.cos(delta)
    assert AdaFaceHead.angular is True and AdaFaceHead.margin_feasibility(dict(AdaFaceHead.settings_2d), 2, 10) == []
    assert AdaFaceHead.margin_feasibility({"margin": bound - 1e-3}, 2, 10) == []
    (line,) = AdaFaceHead.margin_feasibility({"margin": bound + 1e-3}, 2, 10)
    assert f"< 1 − cos δ = {bound:.3f}" in line and "mean feature norm" in line


# ------------------------------------------------------------------- shared behaviour


def _functional(head: torch.nn.Module, labels: torch.Tensor):
    def fn(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.func.functional_call(head, {"weight": w}, (x, labels))
        return out.loss, out.logits

    return fn


@pytest.mark.parametrize("name", HEADS)
def test_gradcheck_float64(name):
    head = make(name, scale=4.0).eval()  # eval: the running statistics stay put between evaluations
    if name == "adaface":
        head.norm_mean.fill_(2.0)
        head.norm_std.fill_(1.0)
    if name == "curricularface":
        head.t.fill_(0.3)
    torch.manual_seed(4)
    x = (torch.randn(5, 6, dtype=torch.float64) * 2).requires_grad_()
    w = head.weight.detach().clone().requires_grad_()
    fn = _functional(head, torch.tensor([0, 1, 2, 3, 4]))
    if name != "adaface":
        assert torch.autograd.gradcheck(fn, (x, w))
        return
    # AdaFace's ẑ is a detached function of ‖x‖ (as in the paper), so a finite difference in x
    # moves ẑ while the analytic gradient ignores it. Check W with ẑ anywhere in (−1, 1), and x
    # with every ẑ clipped to ±1, where it cannot move.
    assert torch.autograd.gradcheck(lambda w: fn(x.detach(), w), (w,))
    head.norm_mean.fill_(5.0)
    head.norm_std.fill_(0.1)
    x_sat = x.detach() / x.detach().norm(dim=1, keepdim=True) * torch.tensor([[0.5], [9.0], [0.5], [9.0], [20.0]])
    assert torch.autograd.gradcheck(lambda x: fn(x, w.detach()), (x_sat.requires_grad_(),))


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("theta", [0.0, math.pi])
def test_finite_gradients_at_zero_and_pi(name, theta):
    head = HEADS[name](2, 2).double().train()
    x, w = planar([theta], [1.0], [0.0, 1.5])
    if name == "subcenter_arcface":
        w = w.repeat_interleave(3, dim=0)
    with torch.no_grad():
        head.weight.copy_(w)
    x.requires_grad_()
    out = head(x, torch.tensor([0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("name", HEADS)
def test_float32_under_autocast_and_no_input_mutation(name):
    head = HEADS[name](6, 5)
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    before = x.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x, torch.tensor([0, 1, 2, 3]))
        logits = head(x)
    assert out.logits.dtype == torch.float32 and logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", HEADS)
def test_state_dict_round_trip(name):
    head = HEADS[name](6, 5).train()
    x, y = torch.randn(4, 6) * 3, torch.tensor([0, 1, 2, 3])
    head(x, y)  # moves the running statistics away from their initial values
    clone = HEADS[name](6, 5)
    clone.load_state_dict(head.state_dict())
    head.eval()
    clone.eval()
    torch.testing.assert_close(clone(x, y).logits, head(x, y).logits)
    torch.testing.assert_close(clone(x), head(x))


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_do_not_give_finite_loss(name, bad):
    head = HEADS[name](6, 5).train()
    x = torch.randn(4, 6)
    x[1, 2] = bad
    out = head(x, torch.tensor([0, 1, 2, 3]))
    assert not torch.isfinite(out.loss)
    for buf in head.buffers():  # running statistics are not poisoned for later steps
        assert torch.isfinite(buf).all()


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize(
    "labels",
    [torch.tensor([0, 1, 5]), torch.tensor([0, -1, 2]), torch.tensor([[0], [1], [2]]), torch.tensor([0.0, 1.0, 2.0])],
    ids=["too-large", "negative", "wrong-shape", "float"],
)
def test_bad_labels_rejected(name, labels):
    with pytest.raises(InvalidInputError, match="labels"):
        HEADS[name](6, 5)(torch.randn(3, 6), labels)


@pytest.mark.parametrize("name", HEADS)
def test_bad_embeddings_rejected(name):
    with pytest.raises(InvalidInputError, match="embeddings"):
        HEADS[name](6, 5)(torch.randn(3, 7))


@pytest.mark.parametrize(
    ("name", "options", "word"),
    [
        ("adaface", {"margin": -0.1}, "margin"),
        ("adaface", {"h": 0}, "h"),
        ("adaface", {"scale": float("inf")}, "scale"),
        ("adaface", {"momentum": 1.5}, "momentum"),
        ("curricularface", {"margin": 4.0}, "margin"),
        ("curricularface", {"momentum": -1}, "momentum"),
        ("subcenter_arcface", {"k": 0}, "k"),
        ("subcenter_arcface", {"scale": 0}, "scale"),
        ("adaface", {"in_features": 0}, "in_features"),
    ],
)
def test_bad_options_rejected(name, options, word):
    kwargs = {"in_features": 6, "num_classes": 5, **options}
    with pytest.raises(InvalidValueError, match=word):
        HEADS[name](**kwargs)
