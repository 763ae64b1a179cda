"""`headreg export` and `headreg eval --onnx`: the three formats, their metadata, the verification, the backbones.

Every export is run back from the file (onnxruntime for ONNX) on batch sizes other than the one it was traced
with and compared with the PyTorch model here, independently of the command's own verification.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _cli import invoke
from click.testing import Result

import headreg
from headreg.engine import export as export_mod
from headreg.engine._export_formats import read_exported
from headreg.engine.export import MIN_COSINE, export_model
from headreg.errors import ExportError, InvalidValueError

DATA = Path(os.environ.get("HEADREG_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAS_MNIST = (DATA / "MNIST" / "raw").is_dir()


def export_cli(*args: str | Path, ok: bool = True) -> Result:
    return invoke(*args, ok=ok, command="export")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LeNet++ with ArcFace, 32-D (an untrained 2-D LeNet++ puts most samples at one angle, where rounding at
    1e-8 reorders the neighbours), with BN statistics that the export has to carry."""
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10, embedding_dim=32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
    return headreg.save_model(model, tmp_path_factory.mktemp("run") / "run").parent


def check_against_eager(model: torch.nn.Module, fmt: str, path: Path, *, with_head: bool, normalize: bool) -> dict:
    """Run the file at batch sizes 1 and 5 and compare each output with PyTorch row by row."""
    run, meta = read_exported(fmt, path)
    model.eval()
    for batch in (1, 5):
        x = torch.randn(batch, *meta["input_size"])
        outs = run(x)
        with torch.no_grad():
            emb = model.embed(x)
            expected = [F.normalize(emb, dim=1) if normalize else emb] + ([model.head(emb)] if with_head else [])
        assert len(outs) == len(expected)
        for got, want in zip(outs, expected, strict=True):
            assert got.shape == want.shape
            assert float(F.cosine_similarity(got.double(), want.double(), dim=1).min()) >= MIN_COSINE
    if normalize:
        assert torch.allclose(outs[0].norm(dim=1), torch.ones(5), atol=1e-5)
    return meta


@pytest.mark.parametrize("fmt", ["onnx", "exported-program", "torchscript"])
def test_each_format_with_head_and_normalize(ckpt: Path, tmp_path: Path, fmt: str) -> None:
    model = headreg.load_model(ckpt)
    out = tmp_path / ("m.pt2" if fmt == "exported-program" else f"m.{fmt}")
    result = export_model(model, out, format=fmt, with_head=True, normalize=True)
    meta = check_against_eager(model, fmt, out, with_head=True, normalize=True)
    assert meta == result.metadata
    assert meta["outputs"] == ["embeddings", "logits"] and meta["input_size"] == [1, 28, 28]
    assert meta["mean"] == [0.1307] and meta["std"] == [0.3081] and meta["embedding_dim"] == 32
    assert meta["head"] == "arcface" and meta["num_classes"] == 10 and meta["normalized"] is True
    assert meta["torch_version"] == torch.__version__ and meta["headreg_version"] == headreg.__version__
    side = json.loads(result.sidecar.read_text())
    assert result.sidecar == out.with_name(out.name + ".json")
    assert {k: side[k] for k in meta} == meta and side["file"] == out.name
    import hashlib

    assert side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert min(side["verification"]["min_cosine"].values()) >= MIN_COSINE
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, result.sidecar.name])  # no temp left


def test_onnx_graph_dynamic_batch_opset_and_metadata_props(ckpt: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "m.onnx"
    export_cli("--checkpoint", ckpt, "--out", out, "--opset", "17")
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert {op.domain: op.version for op in proto.opset_import}[""] == 17
    dim = proto.graph.input[0].type.tensor_type.shape.dim
    assert dim[0].dim_param and not dim[0].HasField("dim_value")  # the batch axis is symbolic
    assert [d.dim_value for d in dim[1:]] == [1, 28, 28]
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["format_version"] == "headreg.export/1" and props["outputs"] == ["embeddings"]
    assert props["opset"] == 17 and props["head"] is None
    assert [o.name for o in proto.graph.output] == ["embeddings"]


@pytest.mark.parametrize(
    "name, kwargs, size, expected",
    [
        ("resnet18", {"in_chans": 1}, 32, [1, 32, 32]),  # a timm CNN
        ("vit_tiny_patch16_224", {"img_size": 32}, None, [3, 32, 32]),  # a ViT: its fixed size is the default
        ("iresnet18", {}, None, [3, 112, 112]),  # a face backbone at its data config's size
        ("torchvision/resnet18", {}, (40, 48), [3, 40, 48]),  # torchvision, non-square
    ],
)
def test_backbones_export_to_onnx(tmp_path: Path, name: str, kwargs: dict, size: object, expected: list) -> None:
    model = headreg.create_model(name, head="cosface", num_classes=7, embedding_dim=16, **kwargs)
    out = tmp_path / "m.onnx"
    result = export_model(model, out, with_head=True, input_size=size)
    meta = check_against_eager(model, "onnx", out, with_head=True, normalize=False)
    assert meta["input_size"] == expected and meta["embedding_dim"] == 16
    assert min(result.min_cosine.values()) >= MIN_COSINE


def test_vit_traces_with_a_dynamic_batch(tmp_path: Path) -> None:
    # TorchScript traces: a ViT reshapes by the batch size, which the trace must keep symbolic
    model = headreg.create_model("vit_tiny_patch16_224", img_size=32)
    export_model(model, tmp_path / "v.pt", format="torchscript")
    check_against_eager(model, "torchscript", tmp_path / "v.pt", with_head=False, normalize=False)


def test_a_mismatch_fails_and_leaves_no_file(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = headreg.load_model(ckpt)
    out = tmp_path / "m.pt"
    out.write_bytes(b"the previous file")

    def noisy(fmt: str, path: Path):
        run, meta = read_exported(fmt, path)
        return (lambda x: tuple(o + 0.05 * torch.randn_like(o) for o in run(x))), meta

    monkeypatch.setattr(export_mod, "read_exported", noisy)
    with pytest.raises(ExportError, match=r"embeddings row \d has cosine 0\.\d+ with PyTorch's, below the required "
                       r"0\.99999 by \d\.\d+e-0\d .*not kept"):  # fmt: skip
        export_model(model, out, format="torchscript")
    assert out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file, no sidecar


def test_api_errors(ckpt: Path, tmp_path: Path) -> None:
    bare = headreg.create_model("lenetpp")
    with pytest.raises(InvalidValueError, match="with_head needs a model with a head"):
        export_model(bare, tmp_path / "a.onnx", with_head=True)
    with pytest.raises(InvalidValueError, match=r"\.pt2 archive"):
        export_model(bare, tmp_path / "a.pt", format="exported-program")
    with pytest.raises(InvalidValueError, match="opset must be an integer >= 17"):
        export_model(bare, tmp_path / "a.onnx", opset=13)
    with pytest.raises(InvalidValueError, match="format must be one of"):
        export_model(bare, tmp_path / "a.onnx", format="tflite")
    with pytest.raises(InvalidValueError, match="input_size has 3 channels, but the model takes 1"):
        export_model(bare, tmp_path / "a.onnx", input_size=(3, 28, 28))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "dataset", ["fake", pytest.param("mnist", marks=pytest.mark.skipif(not HAS_MNIST, reason="no MNIST"))]
)
def test_eval_onnx_gives_the_checkpoints_metrics(ckpt: Path, tmp_path: Path, dataset: str) -> None:
    out = tmp_path / "m.onnx"
    r = export_cli("--checkpoint", ckpt, "--out", out, "--with-head")
    assert "verified against PyTorch" in r.output and str(out) in r.output
    data = ("--dataset", dataset, "--limit", "300", "--json", "--device", "cpu")
    ref = json.loads(invoke("--checkpoint", ckpt, *data, "--save-embeddings", tmp_path / "a.safetensors").stdout)
    got = json.loads(invoke("--onnx", out, *data, "--save-embeddings", tmp_path / "b.safetensors").stdout)
    assert set(got["metrics"]) == set(ref["metrics"]) and "top1_accuracy" in got["metrics"]
    # onnxruntime's embeddings differ from PyTorch's by rounding (~1e-8), which can swap two neighbours or two
    # pairs whose cosines tie to that precision (the fake digits are near-duplicates within a class): one swap
    # moves MAP@R by 1/(N*R) and a TAR@FAR by one positive pair in 4432 here, both below 1e-3.
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-3), key
    assert got["metrics"]["top1_accuracy"] == ref["metrics"]["top1_accuracy"]
    assert got["metrics"]["precision_at_1"] == ref["metrics"]["precision_at_1"]
    from headreg.data import load_embeddings

    a, b = (load_embeddings(tmp_path / f"{n}.safetensors") for n in "ab")
    assert torch.equal(a["labels"], b["labels"])
    assert float(F.cosine_similarity(a["embeddings"].double(), b["embeddings"].double()).min()) >= MIN_COSINE
    assert got["info"]["onnx"] == str(out) and got["info"]["model"] == "lenetpp"
    assert got["info"]["onnx_providers"] == ["CPUExecutionProvider"]
    # normalised, without the head: the embedding metrics are the same (they normalise anyway)
    norm = tmp_path / "n.onnx"
    export_cli("--checkpoint", ckpt, "--out", norm, "--normalize")
    plain = json.loads(invoke("--onnx", norm, *data).stdout)
    assert "top1_accuracy" not in plain["metrics"]
    for key, value in plain["metrics"].items():
        assert value == pytest.approx(ref["metrics"][key], abs=1e-3), key


def test_cli_json_and_bare_model(tmp_path: Path) -> None:
    out = tmp_path / "b.pt"
    r = export_cli("--model", "lenetpp", "--in-chans", "1", "--format", "torchscript", "--out", out, "--json")
    side = json.loads(r.stdout)
    assert side["backbone"] == "lenetpp" and side["format"] == "torchscript" and side["head"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "give one model: --checkpoint RUN or --model NAME"),
        (("--model", "lenetpp", "--with-head"), "--with-head needs a --checkpoint"),
        (("--model", "lenetpp", "--format", "exported-program"), ".pt2 archive"),
        (("--model", "lenetpp", "--input-size", "0"), "must be H, H,W or C,H,W"),
        (("--model", "lenetpp", "--opset", "13"), "13 is not in the range x>=17"),
        (("--model", "lenetpp", "--format", "tflite"), "'tflite' is not one of"),
        (("--model", "lenetpp", "--head", "arcface"), "No such option '--head'"),
    ],
)
def test_cli_export_errors(tmp_path: Path, args: tuple, message: str) -> None:
    r = export_cli(*args, "--out", tmp_path / "x.onnx", ok=False)
    assert message in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_eval_onnx_errors(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    export_cli("--checkpoint", ckpt, "--out", out)
    data = ("--dataset", "fake", "--limit", "20")
    r = invoke("--onnx", out, *data, "--input-size", "32", ok=False)
    assert "was exported at 1x28x28 and takes no other size" in r.output
    assert "does not apply to --onnx" in invoke("--onnx", out, *data, "--head", "arcface", ok=False).output
    assert (
        "give one of --checkpoint, --model and --onnx"
        in invoke("--onnx", out, "--checkpoint", ckpt, *data, ok=False).output
    )
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert "is not an ONNX model onnxruntime can run" in invoke("--onnx", junk, *data, ok=False).output
    assert "no ONNX model at" in invoke("--onnx", tmp_path / "none.onnx", *data, ok=False).output
    import onnx

    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    assert "holds no headreg metadata" in invoke("--onnx", bare, *data, ok=False).output


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxscript", "onnx"])
def test_without_the_export_extra(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    r = export_cli("--checkpoint", ckpt, "--out", tmp_path / "m.onnx", ok=False)
    assert f"needs the optional package '{missing}'" in r.output and "pip install 'headreg[export]'" in r.output
    if missing == "onnxruntime":
        r = invoke("--onnx", tmp_path / "m.onnx", "--dataset", "fake", ok=False)
        assert "pip install 'headreg[export]'" in r.output
    # the torch formats need none of them
    export_cli("--checkpoint", ckpt, "--format", "torchscript", "--out", tmp_path / "m.pt")
