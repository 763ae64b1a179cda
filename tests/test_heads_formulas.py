"""Each built-in head against a float64 reference written here, independently of headreg's maths.

The references use plain acos/cos and loops; the heads use Chebyshev polynomials,
sqrt(1 − cos²) and an autograd.Function. Angles are placed by hand, in 2-D, at 0, near π
and inside ArcFace's θ + m > π fallback region.
"""

from __future__ import annotations

import math

import pytest
import torch

import headreg
from headreg.errors import HeadregError

f64 = torch.float64


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def head_with_weights(name: str, weights: torch.Tensor, **options):
    head = headreg.create_head(name, weights.shape[1], weights.shape[0], **options).double()
    with torch.no_grad():
        head.weight.copy_(weights)
    return head


def ref_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=f64)
    for b in range(logits.shape[0]):
        row = logits[b]
        total = total + (torch.log(torch.exp(row - row.max()).sum()) + row.max() - row[labels[b]])
    return total / logits.shape[0]


def ref_cosines(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=f64)
    for b in range(x.shape[0]):
        for c in range(w.shape[0]):
            out[b, c] = torch.dot(x[b], w[c]) / (x[b].norm() * w[c].norm())
    return out


# Class weights at 0, 90, 180, 270 degrees (norms 1, 2, 0.5, 3: only angles matter);
# embeddings at angles chosen so the target angle spans 0, small, π/2, > π − m, and π.
W = torch.tensor([unit(0.0), [0.0, 2.0], [-0.5, 0.0], [0.0, -3.0]], dtype=f64)
ANGLES = [0.0, 1e-4, 0.3, math.pi / 2, 2.9, math.pi - 1e-4, math.pi]
RADII = [1.0, 2.0, 0.5, 3.0, 1.5, 1.0, 2.5]
X = torch.tensor([[r * a for a in unit(t)] for r, t in zip(RADII, ANGLES, strict=True)], dtype=f64)
Y = torch.zeros(len(ANGLES), dtype=torch.long)  # target class 0 (angle 0): θ_y = the angles above


def ref_margin_loss(target_fn, scale: float, x=X, y=Y, w=W):
    cos = ref_cosines(x, w)
    logits = cos.clone()
    for b in range(x.shape[0]):
        theta = math.acos(max(-1.0, min(1.0, cos[b, y[b]].item())))
        logits[b, y[b]] = target_fn(theta, cos[b, y[b]].item())
    return ref_cross_entropy(scale * logits, y), scale * logits, scale * cos


def test_cosines_match_reference_for_any_weight_norm():
    head = head_with_weights("normface", W, scale=1.0).eval()
    torch.testing.assert_close(head(X), ref_cosines(X, W))


@pytest.mark.parametrize("margin", [0.5, 0.2, 1.0])
def test_arcface_matches_reference_including_fallback(margin):
    s = 64.0

    def target(theta, cos):
        if theta + margin <= math.pi:
            return math.cos(theta + margin)
        return cos - margin * math.sin(margin)  # the reference implementations' fallback

    head = head_with_weights("arcface", W, scale=s, margin=margin)
    out = head(X, Y)
    loss, logits, plain = ref_margin_loss(target, s)
    # At θ = 0 exactly, sin θ is floored at sqrt(eps) ≈ 1.5e-8 (keeps the gradient finite),
    # so s · sin m · 1.5e-8 ≈ 1e-6 is the largest allowed deviation; elsewhere it is exact.
    atol = s * math.sqrt(torch.finfo(f64).eps)
    torch.testing.assert_close(out.logits, logits, rtol=1e-12, atol=atol)
    torch.testing.assert_close(out.logits[1:], logits[1:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, loss, rtol=1e-9, atol=atol)
    torch.testing.assert_close(head(X), plain)


def test_arcface_target_decreases_monotonically_in_theta():
    head = head_with_weights("arcface", W[:1].repeat(2, 1), scale=1.0, margin=0.5)
    thetas = torch.linspace(0, math.pi, 2001, dtype=f64)
    x = torch.stack([thetas.cos(), thetas.sin()], 1)
    target = head(x, torch.zeros(len(thetas), dtype=torch.long)).logits[:, 0]
    assert (target[1:] <= target[:-1] + 1e-12).all()


def test_arcface_easy_margin():
    m = 0.5
    head = head_with_weights("arcface", W, scale=10.0, margin=m, easy_margin=True)
    loss, logits, _ = ref_margin_loss(lambda t, c: math.cos(t + m) if c > 0 else c, 10.0)
    torch.testing.assert_close(head(X, Y).logits, logits)


def test_cosface_matches_reference():
    head = head_with_weights("cosface", W, scale=30.0, margin=0.35)
    loss, logits, _ = ref_margin_loss(lambda t, c: c - 0.35, 30.0)
    out = head(X, Y)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, loss)


def test_normface_has_no_margin_and_learns_scale():
    head = head_with_weights("normface", W, scale=16.0, learn_scale=True)
    loss, logits, _ = ref_margin_loss(lambda t, c: c, 16.0)
    out = head(X, Y)
    torch.testing.assert_close(out.loss, loss)
    out.loss.backward()
    assert head.log_scale.grad is not None and head.log_scale.grad != 0


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.3, 0.2), (1.0, 0.0, 0.35), (1.5, 0.1, 0.05), (2.0, 0.0, 0.0)])
def test_combined_matches_reference(m1, m2, m3):
    def target(theta, cos):
        if m1 == 1.0 and theta + m2 > math.pi:
            return cos - m2 * math.sin(m2) - m3
        return math.cos(m1 * theta + m2) - m3

    head = head_with_weights("combined", W, scale=8.0, m1=m1, m2=m2, m3=m3)
    x, y = X[1:-1], Y[1:-1]  # acos' clamp moves θ by ~1e-8 at exactly 0 and π when m1 ≠ 1
    loss, logits, _ = ref_margin_loss(target, 8.0, x, y)
    torch.testing.assert_close(head(x, y).logits, logits, rtol=1e-6, atol=1e-6)


def test_combined_equals_arcface_and_cosface():
    arc = head_with_weights("arcface", W, scale=64.0, margin=0.5)
    comb = head_with_weights("combined", W, scale=64.0, m1=1.0, m2=0.5, m3=0.0)
    torch.testing.assert_close(comb(X, Y).logits, arc(X, Y).logits)
    cosf = head_with_weights("cosface", W, scale=64.0, margin=0.35)
    comb = head_with_weights("combined", W, scale=64.0, m1=1.0, m2=0.0, m3=0.35)
    torch.testing.assert_close(comb(X, Y).logits, cosf(X, Y).logits)


def ref_psi(theta: float, m: int) -> float:
    k = min(int(math.floor(m * theta / math.pi)), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_sphereface_psi_and_annealing_match_reference(m):
    head = head_with_weights("sphereface", W, margin=m)
    head.train()
    for step in range(3):
        lam = max(5.0, 1000.0 * (1 + 0.12 * step) ** -1)
        out = head(X, Y)
        cos = ref_cosines(X, W)
        norms = X.norm(dim=1)
        logits = cos * norms[:, None]
        for b in range(X.shape[0]):
            theta = math.acos(max(-1.0, min(1.0, cos[b, 0].item())))
            logits[b, 0] = norms[b] * (lam * cos[b, 0] + ref_psi(theta, m)) / (1 + lam)
        torch.testing.assert_close(out.logits, logits, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(out.loss, ref_cross_entropy(logits, Y))
    assert int(head.iteration) == 3


def test_sphereface_psi_is_monotone_and_lambda_reaches_its_floor():
    head = head_with_weights("sphereface", W[:1].repeat(2, 1), margin=4, lambda_min=0.0, base=0.0)
    thetas = torch.linspace(0, math.pi, 1001, dtype=f64)
    x = torch.stack([thetas.cos(), thetas.sin()], 1)
    with torch.no_grad():
        target = head.eval()(x, torch.zeros(len(thetas), dtype=torch.long)).logits[:, 0]
    assert (target[1:] <= target[:-1] + 1e-9).all()
    assert target[0] == pytest.approx(1.0) and target[-1] == pytest.approx(1 - 2 * 4)
    head.iteration.fill_(10**6)
    assert head_with_weights("sphereface", W).lambda_ == 1000.0
    h = head_with_weights("sphereface", W)
    h.iteration.fill_(10**6)
    assert h.lambda_ == 5.0


def test_sphereface_counter_does_not_advance_in_eval():
    head = head_with_weights("sphereface", W).eval()
    head(X, Y)
    head(X)
    assert int(head.iteration) == 0
    head.train()
    head(X)  # no labels, no loss: no step either
    assert int(head.iteration) == 0


def test_sphereface_focal_loss():
    head = head_with_weights("sphereface", W, margin=1, focal_gamma=2.0, base=0.0, lambda_min=0.0).eval()
    out = head(X, Y)
    logp = torch.log_softmax(out.logits, 1)[torch.arange(len(Y)), Y]
    torch.testing.assert_close(out.loss, (-((1 - logp.exp()) ** 2) * logp).mean())


def test_sphereface_rejects_non_integer_m():
    for bad in (2.5, 0, 6, "4", True):
        with pytest.raises(HeadregError, match="integer"):
            headreg.create_head("sphereface", 2, 3, margin=bad)


def test_modified_softmax_and_softmax():
    head = head_with_weights("modified_softmax", W)
    expected = ref_cosines(X, W) * X.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(X), expected)
    torch.testing.assert_close(head(X, Y).loss, ref_cross_entropy(expected, Y))
    sm = head_with_weights("softmax", W)
    with torch.no_grad():
        sm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=f64))
    expected = X @ W.T + sm.bias
    torch.testing.assert_close(sm(X, Y).loss, ref_cross_entropy(expected, Y))


def test_center_loss_value_and_alpha_rule():
    torch.manual_seed(3)
    x = torch.randn(6, 2, dtype=f64)
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    head = head_with_weights("center", W[:3], lambda_c=0.5, alpha=0.3)
    with torch.no_grad():
        head.centers.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        head.bias.zero_()
    centers0 = head.centers.clone()
    out = head.train()(x, y)
    sq = sum(((x[i] - centers0[y[i]]) ** 2).sum() for i in range(6)) / 6
    expected = ref_cross_entropy(x @ W[:3].T, y) + 0.5 * 0.5 * sq
    torch.testing.assert_close(out.loss, expected)
    # Wen et al. Eq. 4: Δc_j = Σ_{y_i = j} (c_j − x_i) / (1 + n_j);  c_j ← c_j − α Δc_j
    for j in range(3):
        members = [i for i in range(6) if y[i] == j]
        delta = sum(centers0[j] - x[i] for i in members) / (1 + len(members))
        torch.testing.assert_close(head.centers[j], centers0[j] - 0.3 * delta)
    assert not head.centers.requires_grad


def test_center_loss_sgd_update_learns_centres():
    head = headreg.create_head("center", 2, 3, center_update="sgd")
    assert isinstance(head.centers, torch.nn.Parameter)
    out = head(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    assert head.centers.grad is not None and head.centers.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["arcface", "cosface", "combined", "normface", "sphereface", "modified_softmax"])
def test_gradients_finite_at_cos_exactly_plus_minus_one(name):
    """x parallel and antiparallel to its class weight: acos and sqrt are clamped, no NaN or inf."""
    head = head_with_weights(name, W)
    x = torch.tensor([[2.0, 0.0], [-3.0, 0.0]], dtype=f64, requires_grad=True)
    out = head(x, torch.tensor([0, 0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    assert x.grad.abs().sum() > 0


def test_arcface_gradient_equals_autograd_of_the_acos_formula():
    """Exact gradients (not insightface's no-grad shortcut), away from the clamps."""
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=f64)
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    head = head_with_weights("arcface", w, scale=10.0, margin=0.3)
    head(x, y).loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    cos = torch.nn.functional.normalize(x2, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    theta = torch.acos(cos[torch.arange(4), y])
    logits = cos.clone()
    logits[torch.arange(4), y] = torch.where(
        theta + 0.3 <= math.pi, torch.cos(theta + 0.3), cos[torch.arange(4), y] - 0.3 * math.sin(0.3)
    )
    torch.nn.functional.cross_entropy(10.0 * logits, y).backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize(
    "name,options",
    [
        ("arcface", {"margin": -0.1}),
        ("arcface", {"margin": 4.0}),
        ("cosface", {"scale": 0}),
        ("cosface", {"scale": -1.0}),
        ("normface", {"scale": float("nan")}),
        ("center", {"alpha": 1.5}),
        ("center", {"center_update": "ema"}),
        ("combined", {"m1": 0.0}),
    ],
)
def test_options_out_of_range_rejected(name, options):
    key = next(iter(options))
    with pytest.raises(HeadregError, match=key) as info:
        headreg.create_head(name, 4, 3, **options)
    assert isinstance(info.value, ValueError)


def test_in_features_and_num_classes_validated():
    with pytest.raises(HeadregError, match="num_classes"):
        headreg.create_head("arcface", 4, 0)
    with pytest.raises(HeadregError, match="in_features"):
        headreg.create_head("arcface", -2, 3)
