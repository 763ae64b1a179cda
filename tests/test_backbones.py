"""Face backbones registered into timm (IResNet, MobileFaceNet) and insightface's published weights.

insightface's layout is re-stated here, independently of headreg's modules, with its parameter names
(``recognition/arcface_torch/backbones/iresnet.py``): a ``backbone.pth`` saved from it must load into
headreg's model through ``pretrained_file=`` and give the same embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

import headreg
import headreg.engine.train
import headreg.models  # noqa: F401 - registers the backbones into timm
from headreg._schema import TRAIN_CONFIG, validate
from headreg.cli import main
from headreg.engine._config import TrainConfig
from headreg.errors import CheckpointError, HeadregError, InvalidValueError

FACE_MODELS = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet"]
INSIGHTFACE_LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


# ---------------------------------------------------------------------------------------------- insightface's layout
class _InsightBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(inplanes), nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2, self.prelu = nn.BatchNorm2d(planes), nn.PReLU(planes)
        self.conv2, self.bn3 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class _InsightIResNet(nn.Module):
    """insightface's IResNet with its names: conv1, bn1, prelu, layer1-4, bn2, dropout, fc, features."""

    def __init__(self, layers: tuple[int, ...], num_features: int = 512) -> None:
        super().__init__()
        self.conv1, self.bn1, self.prelu = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes))
            blocks = [_InsightBlock(inplanes, planes, 2, down)]
            blocks += [_InsightBlock(planes, planes, 1, None) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2, self.dropout = nn.BatchNorm2d(512), nn.Dropout(0.0)
        self.fc, self.features = nn.Linear(512 * 7 * 7, num_features), nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so that a mis-mapped key cannot hide behind an initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                scale = 0.05 if "conv" in name or "fc" in name or "downsample.0" in name else 0.2
                t.copy_(torch.randn(t.shape, generator=g) * scale)
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
                elif name.endswith(".weight") and t.dim() == 1:
                    t.add_(1.0)
    return model


def _param_count(model: nn.Module) -> int:
    """Parameters, counting the embedding BN's fixed scale (a parameter without gradient in insightface, a
    buffer named ``weight`` in headreg)."""
    fixed = sum(b.numel() for n, b in model.named_buffers() if n.endswith(".weight"))
    return sum(p.numel() for p in model.parameters()) + fixed


# ---------------------------------------------------------------------------------------------- timm registration
@pytest.mark.parametrize("name", FACE_MODELS)
def test_registered_in_timm_with_the_face_data_config(name: str) -> None:
    assert name in timm.list_models("*") and name in headreg.models.list_backbones(name)
    cfg = timm.get_pretrained_cfg(name).to_dict()
    assert cfg["input_size"] == (3, 112, 112) and cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["pool_size"] == (7, 7) and cfg["num_classes"] == 0
    with torch.device("meta"):  # the deep ones are only built on the meta device: no memory, no time
        model = timm.create_model(name)
    assert model.num_features == 512 and model.get_classifier().__class__ is nn.Identity
    assert model.get_submodule(cfg["first_conv"]).__class__ is nn.Conv2d


@pytest.mark.parametrize("name", ["iresnet50", "iresnet100", "iresnet200"])
def test_parameter_counts_are_insightfaces(name: str) -> None:
    with torch.device("meta"):
        ours, theirs = timm.create_model(name), _InsightIResNet(INSIGHTFACE_LAYERS[name])
    assert _param_count(ours) == _param_count(theirs)
    if name == "iresnet50":
        assert _param_count(ours) == 43_590_848  # insightface's IResNet-50 with 512-d features: 43.6 M


@pytest.mark.slow
def test_deep_iresnet_at_random_init_is_finite_in_eval_mode() -> None:
    # timm's tests run every registered model, randomly initialised, in eval mode. insightface's N(0, 0.1)
    # convolutions with untrained BN statistics overflow float32 over 49 blocks; the zero-initialised last BN of
    # each block (the default, as timm's zero_init_last) keeps them finite.
    torch.manual_seed(0)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.isfinite(timm.create_model("iresnet100").eval()(x)).all()
        assert not torch.isfinite(timm.create_model("iresnet100", zero_init_residual=False).eval()(x)).all()


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_timm_conventions(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 112, 112)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 7, 7)
    emb = model.forward_head(feats, pre_logits=True)
    assert emb.shape == (2, 512) and emb.dtype == torch.float32
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert torch.equal(model(x), emb)
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16]


def test_fp16_option_changes_nothing_on_cpu() -> None:
    torch.manual_seed(0)
    plain = timm.create_model("iresnet18").eval()
    half = timm.create_model("iresnet18", fp16=True).eval()
    half.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 112, 112)
    assert torch.equal(plain(x), half(x))  # CUDA autocast only, as insightface's torch.cuda.amp


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_body_and_float32_tail_on_cuda() -> None:
    model = timm.create_model("iresnet18", fp16=True).cuda().eval()
    x = torch.randn(2, 3, 112, 112, device="cuda")
    assert model.forward_features(x).dtype == torch.float16 and model(x).dtype == torch.float32


def test_headreg_create_model_with_a_face_backbone() -> None:
    model = headreg.create_model("iresnet18", head="arcface", num_classes=5)
    assert model.num_features == 512 and model.pretrained_cfg["input_size"] == (3, 112, 112)
    assert model.embedding_layer() is model.backbone.module.embed.fc  # --head-lr-scale reaches it
    out = model.train()(torch.randn(2, 3, 112, 112), torch.tensor([0, 3]))
    assert out.logits.shape == (2, 5) and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------- insightface weights
@pytest.fixture(scope="module")
def insightface_r18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(1)
    theirs = _randomise(_InsightIResNet(INSIGHTFACE_LAYERS["iresnet18"])).eval()
    path = tmp_path_factory.mktemp("insightface") / "backbone.pth"
    torch.save(theirs.state_dict(), path)
    return path, theirs


def test_insightface_state_dict_gives_the_same_embeddings(insightface_r18) -> None:
    path, theirs = insightface_r18
    ours = headreg.create_model("iresnet18", pretrained_file=path).eval()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = theirs(x), ours.embed(x)
    assert expected.abs().mean() > 0.1  # not a degenerate comparison
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert "pretrained_file" not in json.dumps(ours.config)  # a checkpoint never names a file to open


def test_insightface_iresnet50_keys_map_onto_headregs() -> None:
    from headreg.models.iresnet import checkpoint_filter_fn

    with torch.device("meta"):
        theirs, ours = _InsightIResNet(INSIGHTFACE_LAYERS["iresnet50"]), timm.create_model("iresnet50")
    mapped = {k: v.shape for k, v in checkpoint_filter_fn(theirs.state_dict()).items()}
    assert mapped == {k: v.shape for k, v in ours.state_dict().items()}


def test_mobilefacenet_keeps_insightfaces_names() -> None:
    with torch.device("meta"):
        keys = {k: tuple(v.shape) for k, v in timm.create_model("mobilefacenet").state_dict().items()}
    assert keys["layers.0.layers.0.weight"] == (128, 3, 3, 3)
    assert keys["layers.1.layers.0.weight"] == (128, 2, 3, 3)  # insightface's groups=64, not depthwise
    assert keys["layers.3.layers.3.layers.2.layers.1.running_var"] == (128,)
    assert keys["conv_sep.layers.2.weight"] == (512,)
    assert keys["features.layers.0.layers.0.weight"] == (512, 1, 7, 7)
    assert keys["features.layers.2.weight"] == (512, 512) and "features.layers.2.bias" not in keys


def test_pretrained_file_is_read_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(tmp_path / "pwned")}, path)  # runs code if fully unpickled
    with pytest.raises(HeadregError, match="could not read pretrained_file"):
        headreg.create_model("iresnet18", pretrained_file=path)
    assert not (tmp_path / "pwned").exists()


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.target,))


def test_pretrained_file_that_does_not_fit_names_the_keys(tmp_path: Path, insightface_r18) -> None:
    bad = tmp_path / "other.pth"
    torch.save({"something.weight": torch.zeros(2)}, bad)
    with pytest.raises(HeadregError, match=r"does not fit backbone IResNet: \d+ missing keys"):
        headreg.create_model("iresnet18", pretrained_file=bad)
    with pytest.raises(HeadregError, match="must hold a state dict"):
        torch.save([1, 2], bad)
        headreg.create_model("iresnet18", pretrained_file=bad)
    with pytest.raises(InvalidValueError, match="not both"):
        headreg.create_model("iresnet18", pretrained=True, pretrained_file=insightface_r18[0])


def test_pretrained_file_stays_refused_from_files(tmp_path: Path, insightface_r18) -> None:
    model = headreg.create_model("lenetpp", in_chans=1, widths=(2, 2, 2))
    headreg.save_model(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["backbone_kwargs"]["pretrained_file"] = str(insightface_r18[0])
    from headreg._schema_backbone import check_backbone_kwargs

    with pytest.raises(CheckpointError, match="pretrained_file is refused"):
        check_backbone_kwargs(config["backbone_kwargs"], where="config.json")
    # run.json: TrainConfig never writes it, and a run record holding it is refused before anything is built
    cfg = TrainConfig(model="iresnet18", head="arcface", dataset="fake", pretrained_file=str(insightface_r18[0]))
    record = cfg.to_dict()
    assert "pretrained_file" not in record
    with pytest.raises(CheckpointError, match="pretrained_file"):
        validate({**record, "pretrained_file": "/tmp/x.pth"}, TRAIN_CONFIG, where="run.json")
    with pytest.raises(InvalidValueError, match="unknown keys"):
        TrainConfig.from_dict({**record, "pretrained_file": "/tmp/x.pth"})


def test_cli_pretrained_file_reaches_train_and_eval(monkeypatch, tmp_path: Path, insightface_r18) -> None:
    seen: dict = {}

    def fake_train(config: TrainConfig, out, **kwargs):
        seen["config"] = config
        raise InvalidValueError("stop here")

    monkeypatch.setattr(headreg.engine.train, "train", fake_train)
    path = str(insightface_r18[0])
    args = ["train", "--model", "iresnet18", "--head", "arcface", "--dataset", "fake", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, [*args, "--pretrained-file", path])
    assert "stop here" in r.output and seen["config"].pretrained_file == path
    r = CliRunner().invoke(
        main, ["eval", "--checkpoint", str(tmp_path), "--dataset", "fake", "--pretrained-file", path]
    )
    assert r.exit_code == 2 and "--pretrained-file goes with --model" in r.output


def test_fp16_option_survives_a_checkpoint(tmp_path: Path) -> None:
    model = headreg.create_model("mobilefacenet", head="cosface", num_classes=3, fp16=True)
    headreg.save_model(model, tmp_path / "ckpt")
    loaded = headreg.load_model(tmp_path / "ckpt")
    assert loaded.backbone.module.fp16 and loaded.config["backbone_kwargs"] == {"fp16": True}


def test_train_starts_from_the_pretrained_file_and_does_not_record_it(monkeypatch, tmp_path: Path) -> None:
    import headreg.models.factory as factory
    from headreg.engine.train import train

    start = timm.create_model("lenetpp", num_classes=0, in_chans=1, widths=(4, 8, 8))
    torch.save(start.state_dict(), tmp_path / "start.pth")
    loaded: list[str] = []
    real = factory.load_pretrained_file
    monkeypatch.setattr(factory, "load_pretrained_file", lambda m, p, **kw: (loaded.append(str(p)), real(m, p, **kw)))
    cfg = TrainConfig(
        model="lenetpp", head="softmax", dataset="fake", model_options={"widths": [4, 8, 8]}, epochs=1, limit=32,
        batch_size=16, test_limit=32, device="cpu", eval_metrics=(), pretrained_file=str(tmp_path / "start.pth"),
    )  # fmt: skip
    result = train(cfg, tmp_path / "run", progress=False)
    assert loaded == [str(tmp_path / "start.pth")] and result.status == "completed"
    assert "start.pth" not in (tmp_path / "run" / "run.json").read_text()
    assert "start.pth" not in (tmp_path / "run" / "config.json").read_text()
