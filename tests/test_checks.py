"""One set of checks: every public entry point checks once, with one wording per fault.

The counting tests spy on `headreg._checks.check_finite`, the one NaN / Inf scan, and assert that
a whole `headreg eval` (or a `compute_metrics` call) runs it once over the embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import headreg
import headreg._checks as checks
from headreg.cli import main
from headreg.data import save_embeddings
from headreg.engine.evaluate import evaluate_embeddings
from headreg.errors import InvalidInputError, InvalidValueError
from headreg.metrics import RetrievalMetrics, compute_metrics, retrieval_metrics
from headreg.plotting import save_embedding_plot


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...]]]:
    """Every call of the NaN / Inf scan: (argument name, shape)."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    real = checks.check_finite

    def spy(x: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
        seen.append((name, tuple(x.shape)))
        return real(x, name)

    monkeypatch.setattr(checks, "check_finite", spy)
    return seen


def _data(n: int = 60, d: int = 8, classes: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return torch.randn(classes, d, generator=g)[y] + 0.3 * torch.randn(n, d, generator=g), y


def test_headreg_eval_of_a_file_scans_the_embeddings_once(tmp_path: Path, scans: list) -> None:
    x, y = _data()
    path = save_embeddings(tmp_path / "e.safetensors", x, y)
    args = ["eval", "--embeddings", str(path), "--json", "--no-progress", "--plot", str(tmp_path / "p.png")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["metrics"]) >= {"precision_at_1", "roc_auc", "nmi"}
    assert scans == [("embeddings", (60, 8))]


def test_headreg_eval_of_a_model_scans_once_with_plot_and_saved_embeddings(tmp_path: Path, scans: list) -> None:
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10)
    run = headreg.save_model(model, tmp_path / "run").parent
    args = ["eval", "--checkpoint", str(run), "--dataset", "fake", "--limit", "80", "--json", "--no-progress"]
    args += ["--plot", str(tmp_path / "p.png"), "--save-embeddings", str(tmp_path / "e.safetensors")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "top1_accuracy" in json.loads(result.stdout)["metrics"]
    assert [name for name, _ in scans] == ["embeddings"] and scans[0][1][0] == 80


def test_query_gallery_files_are_scanned_once_together(tmp_path: Path, scans: list) -> None:
    x, y = _data()
    q = save_embeddings(tmp_path / "q.safetensors", x[:20], y[:20])
    g = save_embeddings(tmp_path / "g.safetensors", x[20:], y[20:])
    result = CliRunner().invoke(main, ["eval", "--embeddings", str(q), "--gallery-embeddings", str(g), "--json"])
    assert result.exit_code == 0, result.output
    assert scans == [("embeddings", (60, 8))]


def test_compute_metrics_scans_once_and_metric_update_once_per_batch(scans: list) -> None:
    x, y = _data()
    compute_metrics(x, y)
    assert scans == [("embeddings", (60, 8))]
    scans.clear()
    metric = RetrievalMetrics()
    metric.update(x[:30], y[:30])
    metric.update(x[30:], y[30:])
    metric.compute()
    assert scans == [("embeddings", (30, 8)), ("embeddings", (30, 8))]


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: compute_metrics(x, y),
        lambda x, y: retrieval_metrics(x, y),
        lambda x, y: evaluate_embeddings(x, y),
        lambda x, y: RetrievalMetrics().update(x, y),
        lambda x, y: save_embedding_plot("never-written.png", x, y),
    ],
    ids=["compute_metrics", "retrieval_metrics", "evaluate_embeddings", "Metric.update", "plot"],
)
def test_one_wording_per_fault(call) -> None:
    x, y = _data()
    x[3, 1] = float("nan")
    x[7, 0] = float("inf")
    with pytest.raises(InvalidInputError) as info:
        call(x, y)
    assert str(info.value).startswith("embeddings") and "must be finite, got 2 of 60 rows with NaN or Inf" in str(
        info.value
    )
    assert "(first at row 3)" in str(info.value)
    with pytest.raises(InvalidInputError, match=r"must have shape \(60,\), got \(59,\)"):
        call(_data()[0], y[:59])


def test_option_checks_share_their_wording() -> None:
    x, y = _data()
    for call in (
        lambda: compute_metrics(x, y, knn_backend="fiass"),
        lambda: retrieval_metrics(x, y, knn_backend="fiass"),
        lambda: evaluate_embeddings(x, y, knn="fiass"),
    ):
        with pytest.raises(InvalidValueError, match=r"must be one of torch, faiss, got 'fiass'; did you mean 'faiss'"):
            call()
    for call in (
        lambda: compute_metrics(x, y, recall_k=(1, 0)),
        lambda: retrieval_metrics(x, y, recall_k=(1, 0)),
        lambda: evaluate_embeddings(x, y, recall_k=(1, 0)),
        lambda: evaluate_embeddings(x, y, recall_k=(True,)),
    ):
        with pytest.raises(InvalidValueError, match="recall_k must be a non-empty sequence of positive integers"):
            call()


def test_one_label_skips_verification_with_a_warning(tmp_path: Path) -> None:
    x, _ = _data()
    y = torch.zeros(60, dtype=torch.long)
    metrics, warnings = evaluate_embeddings(x, y)
    assert "roc_auc" not in metrics and metrics["precision_at_1"] == 1.0 and "nmi" in metrics
    assert any("verification is skipped" in w for w in warnings)
    path = save_embeddings(tmp_path / "one.safetensors", x, y)
    result = CliRunner().invoke(main, ["eval", "--embeddings", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert any("verification is skipped" in w for w in json.loads(result.stdout)["warnings"])
