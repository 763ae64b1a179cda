"""The contract every registered head keeps, built-in or plugin: one test per head and property.

Parametrised over ``headreg.list_heads()``, so a newly registered head (or an installed
plugin's) is tested automatically, as timm parametrises over ``list_models()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import pytest
import torch

import headreg
from headreg.errors import HeadregError
from headreg.heads import head_margin_feasibility
from headreg.registry import head_defaults

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    HEADS = headreg.list_heads()

B, D, C = 12, 16, 7


def _batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    y = torch.arange(B) % C
    return x, y


def _head(name: str) -> torch.nn.Module:
    return headreg.create_head(name, D, C)


def test_builtin_heads_all_registered():
    expected = {"softmax", "modified_softmax", "normface", "sphereface", "arcface", "cosface", "combined", "center"}
    assert expected <= set(HEADS)


@pytest.mark.parametrize("name", HEADS)
def test_training_output_shapes_and_backward(name):
    head = _head(name).train()
    x, y = _batch()
    x.requires_grad_(True)
    out = head(x, y)
    assert isinstance(out, headreg.HeadOutput)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == (B, C)
    out.loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert head.weight.shape[1] == D  # (rows, in_features) as nn.Linear


@pytest.mark.parametrize("name", HEADS)
def test_inference_logits_are_a_plain_tensor(name):
    head = _head(name).eval()
    x, _ = _batch()
    logits = head(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (B, C)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("name", HEADS)
def test_no_margin_in_inference_logits(name):
    """A margin only ever makes the target harder: training target logit ≤ inference target logit."""
    head = _head(name).eval()
    x, y = _batch(torch.float64)
    head = head.double()
    with torch.no_grad():
        plain = head(x)
        trained = head(x, y).logits
    idx = torch.arange(B)
    assert (trained[idx, y] <= plain[idx, y] + 1e-9).all()
    if name in ("softmax", "modified_softmax", "normface", "center"):
        torch.testing.assert_close(trained, plain)
    else:
        assert (trained[idx, y] < plain[idx, y] - 1e-6).any(), "the margin never changed the target logit"


@pytest.mark.parametrize("name", HEADS)
def test_float64(name):
    head = _head(name).double().train()
    x, y = _batch(torch.float64)
    out = head(x, y)
    assert out.loss.dtype == torch.float64 and out.logits.dtype == torch.float64
    out.loss.backward()
    assert head.weight.grad.dtype == torch.float64


@pytest.mark.parametrize("name", HEADS)
def test_bf16_autocast_on_cpu_gives_float32_loss(name):
    head = _head(name).eval()
    x, y = _batch()
    with torch.no_grad():
        ref = head(x, y).loss
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = head(x.bfloat16(), y)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    # Only the inputs were rounded to bf16 (8-bit mantissa); the head itself ran in float32.
    torch.testing.assert_close(out.loss, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", HEADS)
def test_state_dict_round_trip(name):
    head = _head(name).train()
    x, y = _batch()
    for _ in range(3):  # move any running state (centres, counters, EMAs) off its initial value
        head(x, y)
    head.eval()
    clone = _head(name)
    clone.load_state_dict(head.state_dict())
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), head(x))
        torch.testing.assert_close(clone(x, y).loss, head(x, y).loss)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize(
    "labels",
    [
        pytest.param(torch.zeros(B, 1, dtype=torch.long), id="shape-Bx1"),
        pytest.param(torch.zeros(B - 1, dtype=torch.long), id="short"),
        pytest.param(torch.zeros(B), id="float"),
        pytest.param(torch.full((B,), C, dtype=torch.long), id="too-large"),
        pytest.param(torch.full((B,), -1, dtype=torch.long), id="negative"),
    ],
)
def test_bad_labels_rejected(name, labels):
    head = _head(name)
    x, _ = _batch()
    with pytest.raises(HeadregError) as info:
        head(x, labels)
    assert isinstance(info.value, ValueError)
    assert "labels" in str(info.value)


@pytest.mark.parametrize("name", HEADS)
def test_wrong_embedding_width_rejected(name):
    head = _head(name)
    with pytest.raises(HeadregError, match=str(D)):
        head(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", HEADS)
def test_non_finite_embeddings_do_not_give_a_finite_loss(name):
    head = _head(name).eval()
    x, y = _batch()
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[3, 0] = bad
        with torch.no_grad():
            loss = head(x_bad, y).loss
        assert not torch.isfinite(loss), f"{name} turned a {bad} embedding into a finite loss"
    assert x[3, 0] != bad  # the caller's tensor is untouched


@pytest.mark.parametrize("name", HEADS)
def test_caller_tensors_not_modified(name):
    head = _head(name).train()
    x, y = _batch()
    x0, y0 = x.clone(), y.clone()
    head(x, y).loss.backward()
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("name", HEADS)
def test_gradcheck(name):
    """Analytic gradients w.r.t. embeddings and weights equal finite differences (float64)."""
    head = _head(name).double().eval()  # eval: running state (λ step, centres, EMAs) stays fixed
    x, y = _batch(torch.float64)
    x = x[:5].clone().requires_grad_(True)
    y = y[:5]
    weight = head.weight.detach().clone().requires_grad_(True)
    params = {k: v for k, v in head.named_parameters() if k != "weight"}

    def loss_fn(x_, w_):
        return torch.func.functional_call(head, {**params, "weight": w_}, (x_, y)).loss

    if getattr(head, "gradcheck_embeddings", True):
        assert torch.autograd.gradcheck(loss_fn, (x, weight), eps=1e-6, atol=1e-5, rtol=1e-4)
    else:
        # The head stops the gradient through part of its dependence on the embeddings by
        # design (e.g. AdaFace's detached feature norm): check the weight gradient only.
        x = x.detach()
        assert torch.autograd.gradcheck(lambda w_: loss_fn(x, w_), (weight,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", HEADS)
def test_unknown_option_rejected(name):
    with pytest.raises(HeadregError, match="no option"):
        headreg.create_head(name, D, C, not_an_option=1)


@pytest.mark.parametrize("name", HEADS)
def test_warmup_attributes_are_settable_floats_that_change_the_loss(name):
    # A trainer ramps these (`headreg train --head-warmup`): each must read as a float, accept a
    # new value through a validating setter, and change the training loss.
    head = _head(name).train()
    x, y = _batch()
    for attr in getattr(head, "warmup_attributes", ()):
        value = getattr(head, attr)
        assert isinstance(value, float), (attr, type(value))
        before = head(x, y).loss.item()
        setattr(head, attr, value * 0.5)
        assert getattr(head, attr) == pytest.approx(value * 0.5)
        assert head(x, y).loss.item() != pytest.approx(before, rel=1e-9, abs=0), attr
        setattr(head, attr, value)
        with pytest.raises(HeadregError):
            setattr(head, attr, -1.0)
        assert getattr(head, attr) == value  # a rejected value leaves the attribute as it was


@pytest.mark.parametrize("name", HEADS)
def test_self_description_has_the_documented_types(name):
    # What training, compare and the plots read from the class (docs/plugins.md, "Describe the head").
    cls = headreg.get_head_class(name)
    angular = getattr(cls, "angular", False)
    assert isinstance(angular, bool)
    settings = getattr(cls, "settings_2d", {})
    assert isinstance(settings, Mapping) and all(isinstance(k, str) for k in settings)
    head = headreg.create_head(name, 2, 10, **settings).eval()  # options it has, values it accepts
    defaults = head_defaults(cls)
    for dim, classes in ((1, 10), (2, 10), (2, 1000), (128, 10)):
        lines = head_margin_feasibility(cls, dict(defaults), dim, classes)
        assert isinstance(lines, list) and all(isinstance(line, str) and line for line in lines), lines
    # The suggested 2-D settings pass the head's own check for ten classes (the MNIST comparison).
    assert head_margin_feasibility(cls, {**defaults, **settings}, 2, 10) == []
    if angular:  # the decision depends on the direction only: rescaling a feature keeps its class
        x = _batch()[0][:, :2]
        with torch.no_grad():
            assert torch.equal(head(x).argmax(dim=1), head(x * 7.5).argmax(dim=1))


def test_learned_scale_is_not_settable():
    head = headreg.create_head("normface", D, C, learn_scale=True)
    assert head.warmup_attributes == ()
    with pytest.raises(HeadregError, match="learned"):
        head.scale = 2.0
