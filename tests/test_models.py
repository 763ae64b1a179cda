"""create_model over timm, torchvision and headreg backbones; HeadModel conventions; checkpoints."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import headreg
from headreg.errors import CheckpointError, HeadregError, UnknownBackboneError, UnknownHeadError
from headreg.models import HeadModel

# (backbone, kwargs, input size): a CNN, a ViT, a small MobileNet from timm; two torchvision models; LeNet++
BACKBONES = [
    ("resnet18", {"in_chans": 1}, (1, 32, 32)),
    ("vit_tiny_patch16_224", {"img_size": 32}, (3, 32, 32)),
    ("mobilenetv3_small_050", {}, (3, 32, 32)),
    ("torchvision/resnet18", {"in_chans": 1}, (1, 32, 32)),
    ("torchvision/mobilenet_v3_small", {}, (3, 32, 32)),
    ("lenetpp", {"in_chans": 1}, (1, 28, 28)),
]


@pytest.mark.parametrize("backbone,kwargs,size", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_create_model_train_and_infer(backbone, kwargs, size):
    model = headreg.create_model(backbone, head="arcface", num_classes=5, embedding_dim=16, **kwargs)
    assert isinstance(model, HeadModel) and model.num_features == 16 and model.num_classes == 5
    x = torch.randn(4, *size)
    y = torch.tensor([0, 1, 2, 4])
    out = model.train()(x, y)
    assert isinstance(out, headreg.HeadOutput)
    assert out.loss.dim() == 0 and out.logits.shape == (4, 5) and out.embeddings.shape == (4, 16)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(x)
        emb = model.embed(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (4, 5)
        assert emb.shape == (4, 16)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), emb)
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"][0] == size[0] and len(cfg["mean"]) == 3


def test_lenetpp_registered_into_timm_and_matches_the_paper():
    m = timm.create_model("lenetpp", in_chans=1, num_classes=10)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (5, 5) for c in convs)
    assert sum(isinstance(mod, torch.nn.PReLU) for mod in m.modules()) == 6
    assert m.num_features == 2 and m.forward_head(m.forward_features(torch.randn(3, 1, 28, 28)), True).shape == (3, 2)
    m0 = timm.create_model("lenetpp", num_classes=0, embed_dim=3)
    assert m0(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_lenetpp_embedding_dim_sets_the_embedding_layer_no_neck():
    model = headreg.create_model("lenetpp", head="center", num_classes=10, embedding_dim=2)
    assert isinstance(model.neck, torch.nn.Identity)
    assert model.backbone.module.embed.out_features == 2


def test_lenetpp_centred_variant_with_hidden_layer():
    # The quick preset's variant: BN on the flattened features, a 16-wide hidden layer, no embedding bias.
    m = timm.create_model(
        "lenetpp_bn", num_classes=0, widths=[4, 8, 8], feature_bn=True, hidden_dim=16, embed_bias=False
    ).eval()
    assert isinstance(m.feature_norm, torch.nn.BatchNorm1d) and m.feature_norm.num_features == 8 * 3 * 3
    lin = [mod for mod in m.hidden.modules() if isinstance(mod, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(72, 16)]
    assert m.embed.in_features == 16 and m.embed.bias is None and m.embedding_layer is m.embed
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 2)
    plain = timm.create_model("lenetpp", num_classes=0)
    assert isinstance(plain.feature_norm, torch.nn.Identity) and isinstance(plain.hidden, torch.nn.Identity)
    with pytest.raises(ValueError, match="hidden_dim"):
        timm.create_model("lenetpp", hidden_dim=-1)


def test_embedding_model_without_head_and_none_kwargs_dropped():
    model = headreg.create_model("resnet18", embedding_dim=8, drop_rate=None, in_chans=None)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(HeadregError, match="no head"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_nn_module_backbone():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    net.num_features = 6
    model = headreg.create_model(net, head="cosface", num_classes=3)
    out = model(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))
    assert out.embeddings.shape == (4, 6)
    with pytest.raises(HeadregError, match="num_features"):
        headreg.create_model(torch.nn.Linear(2, 2), head="cosface", num_classes=3)


def test_reset_classifier():
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10, embedding_dim=4, head_options={"scale": 8})
    model.reset_classifier(3)
    assert model.head.weight.shape == (3, 4) and model.head.scale == 8 and model.num_classes == 3
    model.reset_classifier(7, head="cosface", margin=0.1)
    assert model.config["head"] == "cosface" and model.head.margin == 0.1
    model.reset_classifier(0)
    assert model.head is None and model(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(UnknownBackboneError, match="resnet18"):
        headreg.create_model("resnet_18", head="arcface", num_classes=2)
    with pytest.raises(UnknownBackboneError, match="did you mean"):
        headreg.create_model("torchvision/resnt18")
    with pytest.raises(UnknownHeadError, match="arcface"):
        headreg.create_model("lenetpp", head="arcfce", num_classes=2)
    with pytest.raises(HeadregError, match="num_classes is required with head 'arcface': backbone 'iresnet18'"):
        headreg.create_model("iresnet18", head="arcface")  # no class count in its pretrained config to default to
    with pytest.raises(HeadregError, match="no option 'margn'"):
        headreg.create_model("lenetpp", head="arcface", num_classes=2, head_options={"margn": 0.1})
    model = headreg.create_model("lenetpp", head="arcface", num_classes=2, in_chans=1)
    with pytest.raises(HeadregError, match=r"1 channels.*\(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(HeadregError, match="labels must lie in"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([0, 2]))
    with pytest.raises(HeadregError, match="floating-point"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    """No weights in the cache and no network: one clear error, and no download is even attempted."""
    import urllib.error

    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (simulated by the test)")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import, which timm has already done: set the constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(HeadregError, match="pretrained weights for backbone 'torchvision/resnet18'"):
        headreg.create_model("torchvision/resnet18", pretrained=True)
    with pytest.raises(HeadregError, match="pretrained weights for backbone 'resnet18'"):
        headreg.create_model("resnet18", pretrained=True)


def test_save_and_load_round_trip(tmp_path):
    model = headreg.create_model(
        "resnet18", head="sphereface", num_classes=4, embedding_dim=8, in_chans=1, head_options={"margin": 3}
    )
    model.train()(torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3]))  # move BN stats and λ counter
    model.eval()
    x = torch.randn(3, 1, 32, 32)
    for path in (tmp_path / "run", tmp_path / "single.safetensors"):
        headreg.save_model(model, path, metadata={"epoch": 3})
        loaded = headreg.load_model(path)
        assert loaded.config["head"] == "sphereface" and loaded.head.margin == 3
        assert int(loaded.head.iteration) == 1 and loaded.config["metadata"] == {"epoch": 3}
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
            torch.testing.assert_close(loaded.embed(x), model.embed(x))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["backbone"] == "resnet18" and cfg["backbone_kwargs"] == {"in_chans": 1}


def test_checkpoint_errors(tmp_path):
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10, embedding_dim=2)
    path = headreg.save_model(model, tmp_path / "run")
    with pytest.raises(CheckpointError, match="head 'arcface', expected 'cosface'"):
        headreg.load_model(tmp_path / "run", head="cosface")
    with pytest.raises(CheckpointError, match="10 classes, expected 5"):
        headreg.load_model(tmp_path / "run", num_classes=5)
    other = headreg.create_model("lenetpp", head="arcface", num_classes=5, embedding_dim=2)
    with pytest.raises(CheckpointError, match=r"shapes differ: head.weight"):
        headreg.models.load_weights(other, path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        headreg.load_model(truncated)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        headreg.load_model(tmp_path / "missing")
    pickled = tmp_path / "evil.safetensors"
    pickled.write_bytes(b"\x80\x04K\x01.")  # a pickle, never unpickled
    with pytest.raises(CheckpointError):
        headreg.load_model(pickled)
    net = torch.nn.Identity()
    net.num_features = 2
    with pytest.raises(CheckpointError, match="nn.Module backbone"):
        headreg.save_model(headreg.create_model(net, head="arcface", num_classes=2), tmp_path / "x")


def test_training_batch_of_one_with_batch_norm_neck_is_a_clear_error():
    model = headreg.create_model("resnet18", head="arcface", num_classes=3, embedding_dim=8).train()
    with pytest.raises(HeadregError, match="at least 2"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([0]))


def test_list_backbones():
    names = headreg.list_backbones("resnet1*")
    assert "resnet18" in names and "torchvision/resnet18" in headreg.list_backbones("torchvision/res*")
    assert "lenetpp" in headreg.list_backbones("lenet*")


# timm's own model contract (its tests/test_models.py), reproduced for the backbones headreg registers into timm.
HEADREG_BACKBONES = sorted(
    n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("headreg.")
)
#: One small model per backbone module, for the checks that run a forward pass (IResNet-200 scripts slowly).
TRACED_BACKBONES = ["lenetpp", "lenetpp_bn", "iresnet18", "mobilefacenet"]


def test_every_headreg_backbone_is_covered():
    assert {"lenetpp", "lenetpp_bn", "iresnet18", "mobilefacenet"} <= set(HEADREG_BACKBONES)
    modules = {timm.models.model_entrypoint(n).__module__ for n in HEADREG_BACKBONES}
    assert modules == {timm.models.model_entrypoint(n).__module__ for n in TRACED_BACKBONES}


@pytest.mark.parametrize("name", HEADREG_BACKBONES)
def test_timm_default_cfg_and_factory_arguments(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    for key in ("input_size", "pool_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier"):
        assert cfg[key] is not None, key
    # timm builds every model on the meta device in its tests; nothing may stay behind on the CPU.
    model = timm.create_model(name, device="meta", dtype=torch.float64)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and model.in_chans == cfg["input_size"][0]
    assert model.num_features > 0 and model.head_hidden_size > 0
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)
    model.reset_classifier(3)  # the new classifier follows the model's device, dtype and mode
    new = model.get_classifier()
    assert (new.weight.device.type, new.weight.dtype, new.training) == ("meta", torch.float64, model.training)
    info = timm.models.FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    assert len(info.channels()) >= 3 and info.reduction() == sorted(info.reduction())
    assert set(info.get("module")) <= dict(model.named_modules()).keys()


@pytest.mark.parametrize("name", TRACED_BACKBONES)
def test_timm_features_torchscript_and_fx(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        assert tuple(feats.shape[-2:]) == tuple(model.pretrained_cfg["pool_size"])
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        extractor = timm.create_model(name, features_only=True).eval()
        maps = extractor(x)
        assert [m.shape[1] for m in maps] == extractor.feature_info.channels()
        assert [m.shape[-1] for m in maps] == [x.shape[-1] // r for r in extractor.feature_info.reduction()]
        torch.testing.assert_close(torch.jit.script(model)(x), out, rtol=0, atol=0)
        nodes = timm.layers.get_graph_node_names(model)[1]
        traced = timm.layers.create_feature_extractor(model, [nodes[-1]])
        torch.testing.assert_close(next(iter(traced(x).values())), out, rtol=0, atol=0)


def test_lenetpp_size_check_survives_torchscript_and_fx_skips_it():
    model = timm.create_model("lenetpp").eval()
    with pytest.raises(torch.jit.Error, match="images of 4×4 do not fit this LeNet\\+\\+"):
        torch.jit.script(model)(torch.randn(1, 1, 4, 4))
    traced = timm.layers.create_feature_extractor(model, [timm.layers.get_graph_node_names(model)[1][-1]])
    assert "_check_size" not in traced.code  # traced graphs hold tensor ops only
