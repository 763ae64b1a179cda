"""`headreg compare` on a tiny budget: one run per head, the figure, the table; its settings and refusals."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from headreg.cli import main
from headreg.compare import (
    DEFAULT_HEADS,
    HEAD_AIDS,
    HEAD_SETTINGS_2D,
    PRESETS,
    head_settings,
    run_compare,
)
from headreg.engine.train import margin_feasibility
from headreg.errors import InvalidValueError, UnknownHeadError

TINY = {"model": "lenetpp", "model_options": {"widths": [4, 8, 8]}, "epochs": 1, "limit": 64, "batch_size": 32,
        "test_limit": 100,
        "device": "cpu", "eval_metrics": ("retrieval", "clustering")}  # fmt: skip


def test_compare_tiny_budget_writes_figure_and_table(tmp_path):
    heads = ["softmax", "arcface", "center"]
    entries = run_compare(heads, "fake", tmp_path / "cmp", overrides=TINY, progress=False)
    assert [e.head for e in entries] == heads
    out = tmp_path / "cmp"
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = json.loads((out / "compare.json").read_text())
    assert [r["head"] for r in table["heads"]] == heads
    for row in table["heads"]:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["precision_at_1"] is not None and row["mean_average_precision_at_r"] is not None
        assert row["train_seconds"] > 0
    md = (out / "compare.md").read_text()
    assert sum(line.startswith(f"| {h} |") for h in heads for line in md.splitlines()) == len(heads)
    for h in heads:  # each head's run is a complete `headreg train` run
        assert (out / h / "model.safetensors").is_file() and (out / h / "eval.json").is_file()
    configs = {h: json.loads((out / h / "run.json").read_text())["config"] for h in heads}
    assert configs["arcface"]["head_options"] == {"scale": 16.0, "margin": 0.2}
    # Aids by what a head can ramp: ArcFace its scale (and x10 lr), center loss its λ, softmax none.
    assert configs["arcface"]["head_lr_scale"] == HEAD_AIDS["scale"]["head_lr_scale"] != 1.0
    assert configs["arcface"]["head_warmup"] == HEAD_AIDS["scale"]["head_warmup"]
    assert configs["center"]["head_warmup"] == HEAD_AIDS["lambda_c"]["head_warmup"]
    assert configs["softmax"]["head_warmup"] == {}
    assert configs["softmax"]["head_lr_scale"] == configs["center"]["head_lr_scale"] == 1.0
    assert [bool(r["aids"]) for r in table["heads"]] == [False, True, True]
    assert "- `arcface`: " in md and "- `center`: " in md and "- `softmax`" not in md

    # Same directory again: refused, then replaced with --overwrite.
    with pytest.raises(InvalidValueError, match="already holds a comparison"):
        run_compare(heads, "fake", out, overrides=TINY, progress=False)
    run_compare(["softmax"], "fake", out, overrides=TINY, progress=False, overwrite=True)
    assert [r["head"] for r in json.loads((out / "compare.json").read_text())["heads"]] == ["softmax"]


def test_2d_settings_are_feasible_and_documented():
    for head in DEFAULT_HEADS:
        assert head in HEAD_SETTINGS_2D
        assert margin_feasibility(head, head_settings(head, 2), 2, 10) == [], head
    # The face-recognition defaults are not, which is why the settings exist.
    assert margin_feasibility("cosface", {}, 2, 10)
    assert head_settings("cosface", 2, {"margin": 0.35})["margin"] == 0.35
    assert head_settings("cosface", 128) == {}
    assert set(PRESETS) == {"quick", "paper"}
    assert 1 - math.cos(2 * math.pi / 10) == pytest.approx(0.191, abs=1e-3)


def test_compare_rejects_bad_input(tmp_path):
    with pytest.raises(UnknownHeadError, match="did you mean 'arcface'"):
        run_compare(["softmax", "arcfce"], "fake", tmp_path / "a", overrides=TINY, progress=False)
    assert not (tmp_path / "a").exists()  # nothing trained, nothing written
    with pytest.raises(InvalidValueError, match="must not repeat"):
        run_compare(["softmax", "softmax"], "fake", tmp_path / "b", overrides=TINY, progress=False)
    with pytest.raises(InvalidValueError, match="preset must be one of"):
        run_compare(["softmax"], "fake", tmp_path / "c", preset="huge", progress=False)


def test_compare_cli_warns_about_infeasible_override_and_errors_cleanly(tmp_path):
    runner = CliRunner()
    args = ["compare", "--dataset", "fake", "--model", "lenetpp", "--model-option", "widths=[4,8,8]", "--epochs", "1",
            "--limit", "64", "--batch-size", "32", "--test-limit", "100", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    r = runner.invoke(main, [*args, "--heads", "cosface", "--head-option", "cosface:margin=0.35", "--out",
                             str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning: cosface margin=0.35 cannot be met with 2-D features and 10 classes" in r.output
    assert "| cosface |" in r.output
    r = runner.invoke(main, [*args, "--heads", "softmax,nope", "--out", str(tmp_path / "d")])
    assert r.exit_code != 0 and "unknown head 'nope'" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, [*args, "--heads", "softmax", "--head-option", "arcface:margin=0.1", "--out",
                             str(tmp_path / "e")])  # fmt: skip
    assert r.exit_code != 0 and "names heads that are not compared: arcface" in r.output
    r = runner.invoke(main, [*args, "--dataset", "nodata", "--heads", "softmax", "--out", str(tmp_path / "f")])
    assert r.exit_code != 0 and "unknown dataset 'nodata'" in r.output
