"""The pairs protocol end to end: ``headreg eval --dataset bin:PATH``, ``--embeddings`` with ``issame``, ``--tta``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from _cli import invoke
from click.testing import CliRunner
from safetensors.torch import load_file
from test_pairs_data import _RunsCode, write_bin
from timm.data import resolve_data_config

import headreg
from headreg.cli import main
from headreg.data import create_dataset, resolve_transform
from headreg.engine.extract import extract_embeddings, iter_batches
from headreg.metrics.pairs import PAIRS_KEYS, pairs_metrics

NUM_PAIRS = 20
#: LeNet++ takes 28x28: the 112x112 faces are resized on the device by the batch transform.
SMALL = ("--input-size", "28")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10)
    return headreg.save_model(model, tmp_path_factory.mktemp("run") / "run").parent


@pytest.fixture(scope="module")
def lfw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bin(tmp_path_factory.mktemp("faces") / "lfw.bin", NUM_PAIRS)


def _embed(model: torch.nn.Module, lfw: Path, tta: str) -> torch.Tensor:
    ds = create_dataset(f"bin:{lfw}")
    transform = resolve_transform(resolve_data_config(model=model), ds, train=False, input_size=28)
    batches = iter_batches(ds.images, ds.labels, 16)
    return extract_embeddings(model, batches, device="cpu", transform=transform, tta=tta, progress=False).embeddings


def test_bin_dataset_through_the_cli(ckpt: Path, lfw: Path, tmp_path: Path) -> None:
    saved = tmp_path / "pairs.safetensors"
    res = invoke("--checkpoint", ckpt, "--dataset", f"bin:{lfw}", *SMALL, "--json", "--save-embeddings", saved)
    out = json.loads(res.stdout)
    info = out["info"]
    assert info["protocol"] == "pairs" and info["tta"] == "flip-sum" and info["num_pairs"] == NUM_PAIRS
    assert info["num_samples"] == 2 * NUM_PAIRS and {"num_queries", "num_gallery"} <= set(info)
    assert tuple(out["metrics"]) == PAIRS_KEYS and out["warnings"] == []
    # The same numbers from the API: the flip-summed embeddings of the one inference pass, then the protocol.
    model = headreg.load_model(ckpt)
    expected = pairs_metrics(_embed(model, lfw, "flip-sum"), create_dataset(f"bin:{lfw}").issame)
    assert out["metrics"] == pytest.approx(expected, abs=1e-6)
    # The saved file holds issame, so it is evaluated by the pairs protocol again, to the same numbers.
    again = json.loads(invoke("--embeddings", saved, "--json").stdout)
    assert again["info"]["protocol"] == "pairs" and again["info"]["file_tta"] == "flip-sum"
    assert again["metrics"] == out["metrics"]
    human = invoke("--embeddings", saved).stdout
    assert "kfold_accuracy" in human and f"{NUM_PAIRS} queries" in human


def test_tta_modes(ckpt: Path, lfw: Path) -> None:
    model = headreg.load_model(ckpt)
    plain = _embed(model, lfw, "none")
    ds = create_dataset(f"bin:{lfw}")
    mirrored = ds.images.flip(-1)
    transform = resolve_transform(resolve_data_config(model=model), ds, train=False, input_size=28)
    batches = iter_batches(mirrored, ds.labels, 16)
    mirror = extract_embeddings(model, batches, device="cpu", transform=transform, progress=False).embeddings
    torch.testing.assert_close(_embed(model, lfw, "flip-sum"), plain + mirror)
    torch.testing.assert_close(_embed(model, lfw, "flip-concat"), torch.cat([plain, mirror], 1))
    res = json.loads(
        invoke("--checkpoint", ckpt, "--dataset", f"bin:{lfw}", *SMALL, "--tta", "flip-concat", "--json").stdout
    )
    assert res["info"]["tta"] == "flip-concat" and res["info"]["embedding_dim"] == 2 * plain.shape[1]
    res = json.loads(invoke("--checkpoint", ckpt, "--dataset", f"bin:{lfw}", *SMALL, "--tta", "none", "--json").stdout)
    assert res["metrics"] == pytest.approx(pairs_metrics(plain, ds.issame), abs=1e-6)


def test_pairs_misuse_is_one_line(ckpt: Path, lfw: Path, tmp_path: Path) -> None:
    r = invoke("--checkpoint", ckpt, "--dataset", f"bin:{lfw}", *SMALL, "--metrics", "retrieval", ok=False)
    assert "verification metrics only" in r.output
    r = invoke("--checkpoint", ckpt, "--dataset", f"bin:{lfw}", *SMALL, "--limit", "10", ok=False)
    assert "cut pairs apart" in r.output
    r = invoke("--checkpoint", ckpt, "--dataset", f"bin:{lfw}", *SMALL, "--tta", "flip", ok=False)
    assert "flip-sum" in r.output
    evil = tmp_path / "evil.bin"
    marker = tmp_path / "pwned"
    evil.write_bytes(pickle.dumps(([_RunsCode(marker), b"x"], [True])))
    r = invoke("--checkpoint", ckpt, "--dataset", f"bin:{evil}", ok=False)
    assert "refusing to load the global" in r.output and "system" in r.output and not marker.exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_match_one(ckpt: Path, lfw: Path, tmp_path: Path) -> None:
    from test_eval_distributed import _run

    # 40 images in batches of 20: each rank's shard is one batch, so both runs see the very same batches.
    args = ("--checkpoint", str(ckpt), "--dataset", f"bin:{lfw}", *SMALL, "--batch-size", "20", "--json")
    one = _run(*args, "--device", "cpu", "--save-embeddings", str(tmp_path / "1.st"), nproc=1)
    two = _run(*args, "--device", "cpu", "--save-embeddings", str(tmp_path / "2.st"), nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["info"]["world_size"] == 2 and b["metrics"] == a["metrics"]
    e1, e2 = load_file(str(tmp_path / "1.st")), load_file(str(tmp_path / "2.st"))
    assert torch.equal(e1["embeddings"], e2["embeddings"]) and torch.equal(e1["issame"], e2["issame"])


def test_training_on_a_pairs_file_is_refused_before_it_is_read(tmp_path: Path) -> None:

    missing = tmp_path / "never-read.bin"
    args = [
        "train",
        "--model",
        "lenetpp",
        "--head",
        "softmax",
        "--dataset",
        f"bin:{missing}",
        "--out",
        str(tmp_path / "r"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "holds verification pairs, not labelled classes" in r.output, r.output
