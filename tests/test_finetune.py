"""Fine-tuning: the default class count, reset_classifier, --pretrained from the local cache only,
--freeze-backbone and --backbone-lr-scale."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import headreg
from headreg.cli import main
from headreg.engine._optim import backbone_parameters, build_optimizer, set_lr
from headreg.engine.train import TrainConfig, resume, train
from headreg.errors import HeadregError, InvalidValueError
from headreg.models.factory import TORCHVISION_PREFIX

TV_RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.DEFAULT, as the torch hub caches it


# ------------------------------------------------------------------------------------------ the class count
@pytest.mark.parametrize(("backbone", "classes"), [("resnet18", 1000), ("lenetpp", 10), ("torchvision/resnet18", 1000)])
def test_a_head_without_num_classes_takes_the_backbones_pretrained_class_count(backbone, classes) -> None:
    model = headreg.create_model(backbone, head="arcface")
    assert model.num_classes == classes == model.head.weight.shape[0] and model.config["num_classes"] == classes


def test_a_backbone_without_a_class_count_keeps_the_clear_error() -> None:
    with pytest.raises(InvalidValueError, match="backbone 'iresnet18' has no class count.*give num_classes"):
        headreg.create_model("iresnet18", head="arcface")
    with pytest.raises(InvalidValueError, match="num_classes must be a positive integer"):
        headreg.create_model("lenetpp", head="arcface", num_classes=0)


def test_reset_classifier_resizes_the_default_head_for_new_data(tmp_path: Path) -> None:
    model = headreg.create_model("lenetpp", head="arcface", embedding_dim=4)  # 10 classes, from the config
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.reset_classifier(3, head="cosface", margin=0.25)
    assert model.num_classes == 3 and model.head.weight.shape == (3, 4) and model.head.margin == 0.25
    out = model(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, backbone_before[k], rtol=0, atol=0)  # only the head is new
    headreg.save_model(model, tmp_path / "m")
    loaded = headreg.load_model(tmp_path / "m")
    assert loaded.config["head"] == "cosface" and loaded.num_classes == 3 and loaded.head.margin == 0.25


# ------------------------------------------------------------------------------------------ --pretrained
@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused; the caches of torch hub and the Hugging Face hub are empty."""
    import huggingface_hub.constants

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(Path.cwd() / "hf-cache"))
    return attempts


def test_pretrained_cache_miss_is_a_clear_error_without_a_download_attempt(no_network, monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in ("resnet18", "torchvision/resnet18"):
        with pytest.raises(HeadregError, match=f"weights for backbone '{name}': they are not in the local cache"):
            headreg.create_model(name, pretrained=True, download=False)
    args = ["train", "--model", "resnet18", "--head", "arcface", "--dataset", "fake", "--pretrained"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert r.exit_code == 1 and "not in the local cache" in r.output and "Traceback" not in r.output, r.output
    assert "--pretrained-file" in r.output  # the other way in
    assert no_network == []
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / TV_RESNET18_FILE).exists()


def _cache_torchvision_resnet18(torch_home: Path) -> dict[str, torch.Tensor]:
    """Put a (random) state dict where the torch hub caches torchvision's resnet18 weights; returns it."""
    import torchvision

    weights = torchvision.models.resnet18().state_dict()
    for v in weights.values():
        if v.is_floating_point():
            v.add_(torch.randn_like(v), alpha=0.01)  # unlike any fresh initialisation
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(weights, torch_home / "hub" / "checkpoints" / TV_RESNET18_FILE)
    return weights


def _backbone_state(model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone.module."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}


def test_train_pretrained_reads_the_cache_and_a_resume_does_not(no_network, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = _cache_torchvision_resnet18(tmp_path / "torch")
    cfg = TrainConfig(
        model=TORCHVISION_PREFIX + "resnet18", head="arcface", dataset="fake", pretrained=True, embedding_dim=8,
        freeze_backbone=1, epochs=1, batch_size=16, limit=32, test_limit=32, device="cpu", eval_metrics=(),
        augment=False,
    )  # fmt: skip
    run = tmp_path / "run"
    start = train(cfg, run, progress=False, stop_after_steps=0)
    for k, v in _backbone_state(start.model).items():
        torch.testing.assert_close(v, cached[k], rtol=0, atol=0, msg=k)
    assert json.loads((run / "run.json").read_text())["config"]["pretrained"] is True

    # The cache is gone: the resumed run takes its weights from its own state and never looks for them.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    lines: list[str] = []
    done = resume(run, progress=False, log=lines.append)
    assert done.status == "completed" and done.global_step == 2 and done.history[-1]["skipped_steps"] == 0
    assert any("backbone frozen for epochs 1-1" in x for x in lines)
    # The whole (one-epoch) run was frozen: the backbone's weights and BN statistics are still the cached ones.
    for k, v in _backbone_state(done.model).items():
        torch.testing.assert_close(v, cached[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(done.model.head.weight, start.model.head.weight)  # the head trained
    assert no_network == []


def test_pretrained_and_pretrained_file_together_are_refused() -> None:
    with pytest.raises(InvalidValueError, match="pretrained or pretrained_file, not both"):
        TrainConfig(model="resnet18", head="arcface", dataset="fake", pretrained=True, pretrained_file="w.pth")


# ------------------------------------------------------------------------------------------ --freeze-backbone
def _config(**kw) -> TrainConfig:
    base = dict(
        model="lenetpp_bn", head="arcface", dataset="fake", embedding_dim=4, model_options={"widths": [4, 8, 8]},
        epochs=2, batch_size=32, limit=128, test_limit=64, optimizer="sgd", lr=0.05, device="cpu", eval_metrics=(),
        freeze_backbone=1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_freeze_backbone_trains_only_the_embedding_layer_neck_and_head_then_everything(tmp_path: Path) -> None:
    initial = train(_config(), tmp_path / "init", progress=False, stop_after_steps=0).model.state_dict()
    frozen = train(_config(), tmp_path / "a", progress=False, stop_after_steps=4)  # the end of epoch 1
    model = frozen.model
    fixed = {id(p) for p in backbone_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in fixed}
    assert names and "backbone.module.embed.weight" not in names
    after = model.state_dict()
    for k, v in after.items():
        if k in names or (k.startswith("backbone.") and "embed." not in k):  # incl. the BN running statistics
            torch.testing.assert_close(v, initial[k], rtol=0, atol=0, msg=k)
    for k in ("backbone.module.embed.weight", "head.weight"):
        assert not torch.equal(after[k], initial[k]), k
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again where it stopped (epoch 2)

    # Resumed at the epoch boundary, or from inside the frozen epoch: the same run, bit for bit.
    a = resume(tmp_path / "a", progress=False)
    train(_config(), tmp_path / "b", progress=False, stop_after_steps=2)
    b = resume(tmp_path / "b", progress=False)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    first = sorted(names)[0]
    assert not torch.equal(a.model.state_dict()[first], initial[first])  # trained once unfrozen


def test_the_frozen_backbone_stays_in_eval_mode_after_a_mid_epoch_evaluation(monkeypatch, tmp_path: Path) -> None:
    """An evaluation between steps puts the model back in training mode; the next step freezes the BN again."""
    import headreg.engine._runner as runner

    real, held = runner.build_session, {}

    def spy(cfg, ranks):
        held["session"] = real(cfg, ranks)
        return held["session"]

    monkeypatch.setattr(runner, "build_session", spy)
    modes: list[bool] = []

    def evaluate_between_steps(step: int) -> None:
        model = held["session"].model
        modes.append(model.backbone.training)
        model.train()  # what extract_embeddings leaves behind

    initial = train(_config(), tmp_path / "init", progress=False, stop_after_steps=0).model.state_dict()
    result = train(_config(), tmp_path / "a", progress=False, stop_after_steps=4, on_step=evaluate_between_steps)
    assert modes == [False] * 4
    for k, v in result.model.state_dict().items():
        if "running_" in k and k.startswith("backbone."):
            torch.testing.assert_close(v, initial[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------------ --backbone-lr-scale
def test_backbone_lr_scale_groups() -> None:
    model = headreg.create_model("lenetpp", head="arcface", num_classes=3, embedding_dim=4, neck="linear_bn")
    opt = build_optimizer(model, "adamw", 1e-3, 5e-4, head_lr_scale=2.0, backbone_lr_scale=0.1)
    set_lr(opt, 1e-2)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        want = 1e-3 if name.startswith("backbone.") else 2e-2 if name.startswith(("head.", "neck.fc.")) else 1e-2
        assert lr_of[id(p)] == pytest.approx(want), name
    assert {n for n, _ in model.named_parameters() if n.startswith("neck.bn")}  # the rest: neck's BN, at 1×
    plain = build_optimizer(model, "adamw", 1e-3, 5e-4)
    assert len(plain.param_groups) == 2 and {g["lr_scale"] for g in plain.param_groups} == {1.0}


def test_cli_fine_tuning_options_reach_the_config(monkeypatch, tmp_path: Path) -> None:
    seen: dict = {}

    def fake_train(cfg: TrainConfig, out, **kwargs):
        seen["config"] = cfg
        raise InvalidValueError("stop here")

    monkeypatch.setattr(headreg.engine.train, "train", fake_train)
    args = ["train", "--model", "resnet18", "--head", "arcface", "--dataset", "fake", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, [*args, "--pretrained", "--freeze-backbone", "2", "--backbone-lr-scale", "0.1"])
    assert "stop here" in r.output, r.output
    cfg = seen["config"]
    assert (cfg.pretrained, cfg.freeze_backbone, cfg.backbone_lr_scale) == (True, 2, 0.1)
    r = CliRunner().invoke(main, [*args, "--backbone-lr-scale", "0"])
    assert r.exit_code == 1 and "backbone_lr_scale must be a finite number > 0" in r.output
