"""`headreg eval` end to end: checkpoints, datasets, embedding files, outputs, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import invoke
from safetensors.torch import save_file

import headreg
from headreg.data import save_embeddings

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10)
    return headreg.save_model(model, tmp_path_factory.mktemp("run") / "run").parent


def as_json(result) -> dict:
    return json.loads(result.stdout)


def test_checkpoint_on_fake_data_json(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = as_json(invoke("--checkpoint", ckpt, "--dataset", "fake", "--limit", "120", "--json", "--output", out))
    assert res["info"]["protocol"] == "leave-one-out" and res["info"]["num_samples"] == 120
    assert res["info"]["head"] == "arcface" and res["info"]["model"] == "lenetpp"
    m = res["metrics"]
    assert 0.0 <= m["precision_at_1"] <= 1.0 and {"top1_accuracy", "top5_accuracy"} <= set(m)
    assert json.loads(out.read_text()) == res


def test_human_table_and_plot(ckpt: Path, tmp_path: Path) -> None:
    plot = tmp_path / "emb.png"
    r = invoke("--checkpoint", ckpt / "model.safetensors", "--dataset", "fake", "--limit", "60", "--plot", plot)
    assert "METRIC" in r.stdout and "precision_at_1" in r.stdout and "images/s" in r.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_save_then_load_embeddings_gives_identical_metrics(ckpt: Path, tmp_path: Path) -> None:
    f = tmp_path / "e.safetensors"
    common = ("--metrics", "retrieval,verification,clustering", "--json")
    a = as_json(invoke("--checkpoint", ckpt, "--dataset", "fake", "--limit", "100", "--save-embeddings", f, *common))
    b = as_json(invoke("--embeddings", f, *common))
    assert a["metrics"] == b["metrics"]
    assert b["info"]["file_dataset"] == "fake" and b["info"]["num_samples"] == 100


def test_query_gallery_protocol_and_its_file(ckpt: Path, tmp_path: Path) -> None:
    f = tmp_path / "qg.safetensors"
    args = ("--checkpoint", ckpt, "--dataset", "fake", "--limit", "50", "--metrics", "retrieval", "--json")
    qg = as_json(invoke(*args, "--query-split", "test", "--gallery-split", "train", "--save-embeddings", f))
    loo = as_json(invoke(*args, "--split", "test"))
    assert qg["info"]["protocol"] == "query/gallery" and loo["info"]["protocol"] == "leave-one-out"
    assert qg["metrics"]["num_queries"] == 50 and qg["metrics"]["num_gallery"] == 50
    assert loo["metrics"]["num_gallery"] == 50
    from headreg.data import load_embeddings

    data = load_embeddings(f)
    assert int(data["is_query"].sum()) == 50 and not bool((data["is_query"] & data["is_gallery"]).any())
    again = as_json(invoke("--embeddings", f, "--metrics", "retrieval", "--json"))
    assert again["metrics"] == qg["metrics"]
    # the same split on both sides is leave-one-out
    same = as_json(invoke(*args, "--query-split", "test", "--gallery-split", "test"))
    assert same["metrics"] == loo["metrics"]


def test_unseen_classes_have_no_top_k_in_either_protocol(ckpt: Path) -> None:
    """A query set of classes no head was trained on gets no top-k accuracy, leave-one-out or query/gallery alike."""
    from headreg.data import create_dataset
    from headreg.engine.evaluate import evaluate_model

    model = headreg.load_model(ckpt)
    query, gallery = create_dataset("fake", "test"), create_dataset("fake", "train")
    kw = {"device": "cpu", "limit": 40, "progress": False}
    assert "top1_accuracy" in evaluate_model(model, query, gallery, **kw).metrics  # the control: classes seen
    query.unseen_classes = True
    for result in (evaluate_model(model, query, gallery, **kw), evaluate_model(model, query, **kw)):
        assert "top1_accuracy" not in result.metrics and "precision_at_1" in result.metrics


def test_separate_gallery_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    q, gal = tmp_path / "q.safetensors", tmp_path / "g.safetensors"
    save_embeddings(q, torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 7]))
    save_embeddings(gal, torch.randn(9, 4, generator=g), torch.arange(9) % 3)
    r = invoke("--embeddings", q, "--gallery-embeddings", gal, "--metrics", "retrieval", "--json")
    res = json.loads(r.stdout)
    assert res["metrics"]["num_queries"] == 6 and res["metrics"]["num_gallery"] == 9
    # query label 7 is absent from the gallery: counted and warned about, not a crash
    assert res["metrics"]["num_queries_without_positive"] == 1
    assert "1 of 6 queries" in r.stderr and res["warnings"]


@pytest.mark.skipif(not (MNIST / "MNIST" / "raw").is_dir(), reason="MNIST not in /work/shared/data")
def test_mnist_with_model_and_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADREG_DATA_DIR", str(MNIST))
    args = ("--model", "lenetpp", "--head", "softmax", "--num-classes", "10", "--dataset", "mnist", "--limit", "80")
    res = as_json(invoke(*args, "--json", "--metrics", "retrieval,classification"))
    assert res["info"]["dataset"] == "mnist" and res["info"]["num_samples"] == 80
    assert set(res["metrics"]) >= {"precision_at_1", "top1_accuracy"}


def _nan_file(p: Path) -> Path:
    emb = torch.randn(5, 3)
    emb[2, 1] = float("nan")
    return save_embeddings(p, emb, torch.tensor([0, 0, 1, 1, 1]))


def _single_file(p: Path) -> Path:
    return save_embeddings(p, torch.randn(1, 3), torch.tensor([0]))


def _float_labels_file(p: Path) -> Path:
    save_file({"embeddings": torch.randn(4, 3), "labels": torch.tensor([0.0, 1.0, 0.0, 1.0])}, str(p))
    return p


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_nan_file, "must be finite, got 1 of 5 rows with NaN or Inf (first at row 2)"),
        (_single_file, "leave-one-out evaluation needs at least 2 samples, got 1"),
        (_float_labels_file, "labels must be an integer tensor"),
    ],
)
def test_bad_embedding_files(make, expected: str, tmp_path: Path) -> None:
    r = invoke("--embeddings", make(tmp_path / "bad.safetensors"), ok=False)
    assert expected in r.output


def test_mismatched_widths(tmp_path: Path) -> None:
    q = save_embeddings(tmp_path / "q.safetensors", torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    g = save_embeddings(tmp_path / "g.safetensors", torch.randn(4, 5), torch.tensor([0, 0, 1, 1]))
    r = invoke("--embeddings", q, "--gallery-embeddings", g, ok=False)
    assert "gallery embeddings must have the query width D=3, got shape (4, 5)" in r.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--dataset", "mnsit"), "unknown dataset 'mnsit'; did you mean 'mnist'"),
        (("--dataset", "mnist", "--data-dir", "{tmp}/nowhere"), "dataset 'mnist' (test split) not found: looked in"),
        (("--dataset", "imagefolder:{tmp}/folder", "--split", "test"), "no images found in"),
        (("--dataset", "fake", "--head", "cosface"), "has head 'arcface', expected 'cosface'"),
        (("--dataset", "fake", "--limit", "1"), "at least 2 samples, got 1"),
        (("--dataset", "fake", "--recall-k", "1,x"), "comma-separated positive integers"),
        (("--dataset", "fake", "--metrics", "retrieval,acc"), "subset of retrieval,verification"),
        (("--dataset", "fake", "--query-split", "test"), "--query-split and --gallery-split go together"),
        (("--dataset", "fake", "--plot", "{tmp}/p.txt"), "must end in one of .png"),
    ],
)
def test_bad_model_inputs(ckpt: Path, tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    (tmp_path / "folder" / "test" / "cls").mkdir(parents=True)  # a split with a class but no image
    args = tuple(a.replace("{tmp}", str(tmp_path)) for a in args)
    r = invoke("--checkpoint", ckpt, *args, ok=False)
    assert expected in r.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "nothing to evaluate"),
        (("--checkpoint", "{tmp}/none"), "no checkpoint at"),
        (("--model", "lenetpp"), "a model needs --dataset"),
        (("--model", "lenetpp", "--head", "arcface", "--dataset", "fake"), "needs --num-classes"),
        (("--embeddings", "{tmp}/none.safetensors"), "embeddings file not found"),
        (("--embeddings", "{tmp}/e.safetensors", "--metrics", "classification"), "needs head predictions"),
    ],
)
def test_bad_sources(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    save_embeddings(tmp_path / "e.safetensors", torch.randn(4, 2), torch.tensor([0, 0, 1, 1]))
    args = tuple(a.replace("{tmp}", str(tmp_path)) for a in args)
    if args[:2] == ("--checkpoint", f"{tmp_path}/none"):
        args = (*args, "--dataset", "fake")
    r = invoke(*args, ok=False)
    assert expected in r.output


def test_real_process_json_and_clean_error(ckpt: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "headreg", "eval", "--checkpoint", str(ckpt), "--dataset", "fake"]
    ok = subprocess.run([*cmd, "--limit", "40", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["info"]["num_samples"] == 40  # stdout is JSON only
    bad = subprocess.run([*cmd, "--head", "softmax"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "Error: checkpoint" in bad.stderr and "expected 'softmax'" in bad.stderr
