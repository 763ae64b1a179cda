"""Heads describe themselves: training's margin check and compare's figure ask the head class, not a name list.

The example plugin's CurricularFace is the case that matters: it is as angular as ArcFace, with
ArcFace's margin, and must be treated as ArcFace is without headreg knowing its name.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import headreg
import headreg.plotting
from headreg.cli import main
from headreg.engine.train import margin_feasibility


@pytest.fixture
def examples_plugin(fresh_registry):
    try:
        importlib.metadata.distribution("headreg-examples")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("headreg-examples is not installed; run the README's set-up (pip install -e plugins/...)")
    assert "curricularface" in headreg.list_heads()
    return fresh_registry


TINY_ARGS = ["--model", "lenetpp", "--dataset", "fake", "--model-option", "widths=[4,8,8]", "--epochs", "1",
             "--batch-size", "32", "--limit", "64", "--test-limit", "100", "--device", "cpu",
             "--no-progress"]  # fmt: skip


def test_train_warns_when_a_plugin_heads_margin_cannot_be_met(examples_plugin, tmp_path):
    # 10 classes in the plane are at most 2π/10 = 0.628 rad apart; CurricularFace's margin is ArcFace's.
    r = CliRunner().invoke(
        main,
        ["train", *TINY_ARGS, "--head", "curricularface", "--embedding-dim", "2", "--head-option", "margin=1.0",
         "--head-option", "scale=16", "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning: curricularface margin=1 rad cannot be met with 2-D features and 10 classes" in r.output
    assert "must be < δ = 0.628 rad" in r.output
    # Its suggested 2-D settings (the class's settings_2d) are feasible: no warning without --head-option.
    assert margin_feasibility("curricularface", {"scale": 16.0, "margin": 0.2}, 2, 10) == []


def test_compare_draws_a_plugin_angular_head_on_the_unit_circle(examples_plugin, tmp_path, monkeypatch):
    calls: list[tuple[str, bool]] = []
    real = headreg.plotting.plot_embeddings

    def spy(ax: Any, embeddings: torch.Tensor, labels: torch.Tensor, title: str | None = None, **kw: Any) -> Any:
        calls.append((title or "", bool(kw.get("normalize", False))))
        return real(ax, embeddings, labels, title=title, **kw)

    monkeypatch.setattr(headreg.plotting, "plot_embeddings", spy)
    r = CliRunner().invoke(
        main, ["compare", *TINY_ARGS, "--heads", "softmax,curricularface", "--out", str(tmp_path / "cmp")]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cmp" / "compare.png").is_file()
    # One panel per head as trained, then the normalised panel for the angular head only.
    assert [normalize for _, normalize in calls] == [False, False, True]
    assert calls[1][0].startswith("curricularface") and calls[2][0] == "normalised"
    # compare trained it with the settings its class suggests for 2-D features.
    assert "| curricularface | scale=16.0, margin=0.2 |" in r.output


def test_the_driver_asks_any_head_class(fresh_registry):
    """A head defined in-process, not a subclass of headreg's Head, gets what a built-in gets."""

    class PlainHead(nn.Module):
        """No self-description at all: Head's defaults apply."""

        def __init__(self, in_features: int, num_classes: int, margin: float = 0.3) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(num_classes, in_features))
            self.margin = margin

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
            return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    class TinyMarginHead(PlainHead):
        """An additive cosine margin that must stay below 0.5, described through the hooks."""

        angular = True
        settings_2d: ClassVar[dict[str, float]] = {"margin": 0.1}

        @classmethod
        def margin_feasibility(cls, options: dict[str, Any], embedding_dim: int, num_classes: int) -> list[str]:
            return [f"margin={options['margin']:g} is too large"] if options["margin"] >= 0.5 else []

    headreg.register_head("tinymargin")(TinyMarginHead)
    headreg.register_head("plainhead")(PlainHead)
    try:
        assert margin_feasibility("tinymargin", {}, 2, 10) == []  # default 0.3 filled in
        assert margin_feasibility("tinymargin", {"margin": 0.7}, 2, 10) == ["tinymargin margin=0.7 is too large"]
        assert margin_feasibility("tinymargin", {"margin": None}, 1, 10) == [
            "tinymargin normalises features, and 10 classes cannot be separated by angle in 1-D"
        ]
        assert margin_feasibility("plainhead", {"margin": 0.7}, 1, 10) == []
        assert margin_feasibility("no_such_head", {}, 2, 10) == []

        from headreg.compare import HEAD_SETTINGS_2D, _angular, head_settings

        assert head_settings("tinymargin", 2) == {"margin": 0.1} and head_settings("tinymargin", 8) == {}
        assert HEAD_SETTINGS_2D["plainhead"] == {} and "no_such_head" not in HEAD_SETTINGS_2D
        assert _angular("tinymargin") and not _angular("plainhead") and not _angular("no_such_head")
    finally:
        headreg.registry.unregister_head("tinymargin")
        headreg.registry.unregister_head("plainhead")
