"""Adversarial inputs, one table row each: crafted checkpoints and run files, flipped bytes, edited heads,
loose option types, a blocked plugin, images too small. Each must end in a headreg error naming the fault.

The rows are issue #11's cases (a checkpoint is untrusted input) and more like them; docs/reliability.md
says which guarantee each row checks.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import headreg
from headreg.engine._rundir import RunDir
from headreg.errors import CheckpointError, InvalidInputError, InvalidValueError, UnknownHeadError
from headreg.heads.base import HeadOptionWarning
from headreg.models.checkpoint import UnverifiedCheckpointWarning

META = "headreg_config"


# ---------------------------------------------------------------------------------------------- helpers
def _saved(tmp_path: Path, head: str = "arcface") -> Path:
    """A small run-directory checkpoint (model.safetensors + config.json)."""
    model = headreg.create_model("lenetpp", head=head, num_classes=4, in_chans=1, widths=(2, 2, 2))
    headreg.save_model(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rewrite_config(ckpt: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Edit the config in model.safetensors' metadata (config.json is only a fallback)."""
    weights = ckpt / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        config = json.loads(f.metadata()[META])
    config = edit(config) or config
    save_file(load_file(str(weights)), str(weights), metadata={META: json.dumps(config)})


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets the dotted key ``path`` to ``value``."""

    def edit(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            obj = obj.setdefault(key, {})
        obj[last] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            obj = obj[key]
        del obj[last]

    return edit


@pytest.fixture
def no_network_no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches torch.load or a hub download while a checkpoint loads."""

    def boom(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"a crafted checkpoint reached torch.load / a download: {args[:1]}")

    import timm.models._builder as builder
    import timm.models._hub as hub

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(torch.hub, "download_url_to_file", boom)
    for module in (builder, hub):
        for name in ("load_state_dict_from_url", "download_cached_file", "hf_hub_download", "load_state_dict_from_hf"):
            monkeypatch.setattr(module, name, boom, raising=False)


# ---------------------------------------------------------------------------------------------- crafted configs
CRAFTED_CONFIGS = [
    ("checkpoint_path", _set("backbone_kwargs.checkpoint_path", "/etc/passwd.pth"), "checkpoint_path is refused"),
    ("pretrained", _set("backbone_kwargs.pretrained", True), "backbone_kwargs.pretrained is refused"),
    (
        "pretrained_cfg_overlay",
        _set("backbone_kwargs.pretrained_cfg_overlay", {"url": "http://example.invalid/w.pth"}),
        "pretrained_cfg_overlay is refused",
    ),
    ("pretrained_file", _set("backbone_kwargs.pretrained_file", "/tmp/x.pth"), "pretrained_file is refused"),
    ("num_classes collides", _set("backbone_kwargs.num_classes", 7), "backbone_kwargs.num_classes is refused"),
    ("unknown backbone option", _set("backbone_kwargs.act_layer", "os.system"), "not an allowed backbone option"),
    ("in_chans 0", _set("backbone_kwargs.in_chans", 0), "backbone_kwargs.in_chans must be in"),
    ("in_chans bool", _set("backbone_kwargs.in_chans", True), "backbone_kwargs.in_chans must be an integer"),
    ("hub backbone", _set("backbone", "hf-hub:someone/model"), "must be a registered model name"),
    ("path backbone", _set("backbone", "local-dir:/tmp/model"), "must be a registered model name"),
    ("head_options list", _set("head_options", [1, 2]), "head_options must be an object"),
    ("num_classes text", _set("num_classes", "4"), "num_classes must be an integer"),
    ("neck unknown", _set("neck", "mlp"), "neck must be one of"),
    ("unknown key", _set("module", "os"), "unknown key 'module'"),
    ("backbone missing", _drop("backbone"), "required key 'backbone' is missing"),
    ("bad digest", _set("weights_sha256", "xyz"), "weights_sha256 must be 64"),
    ("not an object", lambda cfg: [cfg], "has format"),
]


@pytest.mark.parametrize("edit,fragment", [r[1:] for r in CRAFTED_CONFIGS], ids=[r[0] for r in CRAFTED_CONFIGS])
def test_crafted_config_is_refused_before_anything_is_built(tmp_path, no_network_no_pickle, edit, fragment):
    ckpt = _saved(tmp_path)
    _rewrite_config(ckpt, edit)
    with pytest.raises(CheckpointError, match=fragment) as info:
        headreg.load_model(ckpt)
    assert "config stored in" in str(info.value) or "model.safetensors" in str(info.value)  # names the file


def test_crafted_config_json_is_refused_and_named(tmp_path, no_network_no_pickle):
    # A checkpoint whose config lives in config.json only (safetensors without headreg metadata).
    ckpt = _saved(tmp_path)
    weights = ckpt / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))
    config = json.loads((ckpt / "config.json").read_text())
    config["backbone_kwargs"]["checkpoint_path"] = str(tmp_path / "payload.pth")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: backbone_kwargs\.checkpoint_path is refused"):
        headreg.load_model(ckpt)


def test_create_model_still_takes_what_timm_takes(tmp_path):
    # The allow-list is for files; the Python API passes a user's own arguments to timm unchanged.
    model = headreg.create_model("resnet18", head="arcface", num_classes=3, in_chans=1, drop_path_rate=0.1)
    assert model.config["backbone_kwargs"] == {"in_chans": 1, "drop_path_rate": 0.1}
    with pytest.raises(InvalidValueError, match="in_chans must be a positive integer"):
        headreg.create_model("resnet18", head="arcface", num_classes=3, in_chans=0)


# ---------------------------------------------------------------------------------------------- integrity
def _flip_tensor_byte(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes, past the JSON header
    weights.write_bytes(bytes(data))


def _edit_config_json_only(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # no headreg metadata: config.json is read
    config = json.loads((ckpt / "config.json").read_text())
    config["head"] = "cosface"  # same tensor shapes as arcface
    (ckpt / "config.json").write_text(json.dumps(config))


def _edit_metadata_head(ckpt: Path) -> None:
    _rewrite_config(ckpt, _set("head", "cosface"))


TAMPERED = [
    ("flipped byte", _flip_tensor_byte, "checksum mismatch: the tensors"),
    ("config.json-only edited to another head", _edit_config_json_only, "checksum mismatch: the config"),
    ("metadata edited to another head", _edit_metadata_head, "checksum mismatch: the config"),
]


@pytest.mark.parametrize("tamper,fragment", [r[1:] for r in TAMPERED], ids=[r[0] for r in TAMPERED])
def test_tampered_checkpoint_is_a_checksum_mismatch(tmp_path, tamper, fragment):
    ckpt = _saved(tmp_path)
    tamper(ckpt)
    with pytest.raises(CheckpointError, match=fragment):
        headreg.load_model(ckpt)
    headreg.load_model(ckpt, verify=False)  # the escape hatch (headreg eval --no-verify)


def test_checkpoint_without_digests_loads_with_a_note(tmp_path):
    ckpt = _saved(tmp_path)

    def strip(cfg: dict[str, Any]) -> None:
        del cfg["weights_sha256"], cfg["config_sha256"]

    _rewrite_config(ckpt, strip)
    with pytest.warns(UnverifiedCheckpointWarning, match="without an integrity check"):
        model = headreg.load_model(ckpt)
    assert model.config["head"] == "arcface"


def test_round_trip_verifies_quietly(tmp_path):
    ckpt = _saved(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = headreg.load_model(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert len(config["weights_sha256"]) == 64 and len(config["config_sha256"]) == 64
    assert headreg.models.checkpoint.tensors_sha256(model.state_dict()) == config["weights_sha256"]


def test_eval_no_verify_flag(tmp_path):
    from click.testing import CliRunner

    from headreg.cli import main

    ckpt = _saved(tmp_path)
    _flip_tensor_byte(ckpt)
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "fake", "--limit", "16", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "checksum mismatch" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------- run directories
def _record(**config: Any) -> dict[str, Any]:
    base = {"model": "lenetpp", "head": "arcface", "dataset": "fake", "epochs": 2}
    return {"format": "headreg.run/1", "status": "stopped", "config": {**base, **config}}


def _resume_meta(progress: Any) -> dict[str, Any]:
    return {"format": "headreg.resume/1", "global_step": "3", "state": {"model": {}, "progress": progress}}


RUN_FILES = [
    ("run.json without config", "run.json", {"format": "headreg.run/1", "status": "stopped"}, "required key 'config'"),
    ("run.json epochs -5", "run.json", _record(epochs=-5), "config.epochs must be >= 1"),
    ("run.json head_options list", "run.json", _record(head_options=[1]), "config.head_options must be an object"),
    (
        "run.json checkpoint_path",
        "run.json",
        _record(model_options={"checkpoint_path": "/x.pth"}),
        "config.model_options.checkpoint_path is refused",
    ),
    ("run.json unknown key", "run.json", _record(exec="os.system"), "unknown key 'config.exec'"),
    ("run.json is a list", "run.json", [1, 2], "the top level must be an object"),
    ("resume.json without progress", "resume.json", {**_resume_meta({}), "state": {}}, "'state.progress' is missing"),
    ("resume.json epoch -5", "resume.json", _resume_meta({"epoch": -5, "global_step": 3}), "epoch must be >= 0"),
    ("resume.json step text", "resume.json", _resume_meta({"epoch": 1, "global_step": "3"}), "must be an integer"),
]


@pytest.mark.parametrize("name,content,fragment", [r[1:] for r in RUN_FILES], ids=[r[0] for r in RUN_FILES])
def test_crafted_run_file_is_refused(tmp_path, name, content, fragment):
    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=fragment) as info:
        RunDir(tmp_path).read_json(name, missing="absent")
    assert name in str(info.value)  # the message names the file


def test_metrics_line_that_is_a_list(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n[1, 2]\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl line 2: the top level must be an object"):
        RunDir(tmp_path).read_metrics()


def test_resume_of_run_without_config_is_a_clean_error(tmp_path):
    from headreg.engine.train import resume

    (tmp_path / "run.json").write_text(json.dumps({"format": "headreg.run/1", "status": "stopped"}))
    with pytest.raises(CheckpointError, match="required key 'config' is missing"):
        resume(tmp_path)


def test_run_json_edited_to_another_head_is_refused(tmp_path):
    run = tmp_path / "run"
    model = headreg.create_model("lenetpp", head="arcface", num_classes=4, in_chans=1)
    headreg.save_model(model, run)
    (run / "run.json").write_text(json.dumps(_record(head="cosface")))
    with pytest.raises(CheckpointError, match="config.head is 'cosface', but the run's weights"):
        RunDir(run).read_record()
    (run / "run.json").write_text(json.dumps(_record(head="arcface", head_options={})))
    assert RunDir(run).read_record()["config"]["head"] == "arcface"


# ---------------------------------------------------------------------------------------------- option types
LOOSE_OPTIONS = [
    ("scale bool", "arcface", {"scale": True}, "scale must be a finite number"),
    ("scale text", "cosface", {"scale": "64"}, "scale must be"),
    ("scale 1e308", "arcface", {"scale": 1e308}, "scale must be a finite number in"),
    ("scale nan", "normface", {"scale": float("nan")}, "scale must be"),
    ("learn_scale text", "normface", {"learn_scale": "false"}, "learn_scale must be True or False"),
    ("learn_scale int", "normface", {"learn_scale": 1}, "learn_scale must be True or False"),
    ("cosface margin 1e300", "cosface", {"margin": 1e300}, "margin must be a finite number in"),
    ("cosface margin 2", "cosface", {"margin": 2.0}, "margin must be a finite number in"),
    ("arcface margin bool", "arcface", {"margin": False}, "margin must be"),
    ("easy_margin text", "arcface", {"easy_margin": "no"}, "easy_margin must be True or False"),
    ("combined m1 1e300", "combined", {"m1": 1e300}, "m1 must be"),
    ("combined m2 > pi", "combined", {"m2": 4.0}, "m2 must be in"),
    ("combined m3 3", "combined", {"m3": 3.0}, "m3 must be"),
    ("softmax bias text", "softmax", {"bias": "false"}, "bias must be True or False"),
    ("center lambda_c text", "center", {"lambda_c": "0.1"}, "lambda_c must be"),
    ("center lambda_c 1e300", "center", {"lambda_c": 1e300}, "lambda_c must be"),
    ("center alpha 2", "center", {"alpha": 2.0}, "alpha must be"),
    ("sphereface base 1e300", "sphereface", {"base": 1e300}, "base must be"),
    ("sphereface margin bool", "sphereface", {"margin": True}, "margin must be an integer"),
    ("plugin curricularface scale bool", "curricularface", {"scale": True}, "scale must be"),
    ("plugin adaface scale text", "adaface", {"scale": "64"}, "scale must be"),
    ("plugin subcenter scale 1e308", "subcenter_arcface", {"scale": 1e308}, "scale must be"),
]


@pytest.mark.parametrize("head,options,fragment", [r[1:] for r in LOOSE_OPTIONS], ids=[r[0] for r in LOOSE_OPTIONS])
def test_loose_option_types_are_refused(fresh_registry, head, options, fragment):
    if head not in headreg.list_heads():
        pytest.skip(f"{head} is not registered (the example plugin is not installed)")
    with pytest.raises(InvalidValueError, match=fragment):
        headreg.create_model("lenetpp", head=head, num_classes=4, in_chans=1, head_options=options)


def test_scale_beyond_the_papers_warns_but_builds():
    with pytest.warns(HeadOptionWarning, match="scale=2000"):
        model = headreg.create_model("lenetpp", head="arcface", num_classes=4, in_chans=1, head_options={"scale": 2000})
    assert model.head.scale == 2000.0
    model.head.scale = 64.0  # a setter (warm-up) takes numbers as before
    with pytest.raises(InvalidValueError, match="scale must be"):
        model.head.scale = True


def test_numpy_numbers_and_bools_are_still_numbers_and_bools():
    import numpy as np

    head = headreg.create_head("normface", 4, 3, scale=np.float32(16.0), learn_scale=np.bool_(False))
    assert head.scale == 16.0 and head.learn_scale is False


# ---------------------------------------------------------------------------------------------- plugins, inputs
@pytest.mark.parametrize(
    "variable,value", [("HEADREG_BLOCK_PLUGINS", "examples"), ("HEADREG_LOAD_PLUGINS", "")], ids=["block", "load"]
)
def test_head_of_a_blocked_plugin_names_the_plugin_and_variable(fresh_registry, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    fresh_registry.reset_plugins()
    if "examples" not in fresh_registry.plugin_infos():
        pytest.skip("the example plugin is not installed")
    with pytest.raises(UnknownHeadError, match=f"'examples' \\(blocked by {variable}"):
        headreg.create_head("curricularface", 4, 3)


class _PoolingBackbone(nn.Module):
    """A backbone whose 4×4 pooling needs inputs of at least 6×6."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x)).mean((2, 3))


TINY_INPUTS = [
    ("lenetpp 4x4", lambda: headreg.create_model("lenetpp", in_chans=1), (1, 4, 4), "LeNet\\+\\+ of 3 stages is 8×8"),
    (
        "vit wrong size",
        lambda: headreg.create_model("vit_tiny_patch16_224", img_size=32),
        (3, 16, 16),
        "exactly 32×32",
    ),
    ("pooling window", lambda: headreg.create_model(_PoolingBackbone()), (3, 4, 4), "images of 4×4 are too small"),
]


@pytest.mark.parametrize("build,shape,fragment", [r[1:] for r in TINY_INPUTS], ids=[r[0] for r in TINY_INPUTS])
def test_images_too_small_name_the_size_needed(build, shape, fragment):
    model = build().eval()
    with pytest.raises(InvalidInputError, match=fragment):
        model.embed(torch.randn(2, *shape))


def test_lenetpp_built_for_a_too_small_input_size():
    with pytest.raises(InvalidValueError, match="the minimum is 8×8"):
        headreg.create_model("lenetpp", in_chans=1, input_size=(4, 4))
