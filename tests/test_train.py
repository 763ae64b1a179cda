"""`headreg train` and its engine: every head learns, checkpoints load, resume is exact, bad input is refused."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from click.testing import CliRunner

import headreg
from headreg.cli import main
from headreg.engine.train import MarginFeasibilityWarning, TrainConfig, margin_feasibility, resume, train
from headreg.errors import InvalidValueError
from headreg.heads._builtin import BUILTIN_HEADS

TINY = {"widths": [4, 8, 8]}
# SphereFace's λ anneals from 1000, which changes the loss it reports; a constant λ keeps "loss goes down" meaningful.
STEADY = {"sphereface": {"base": 0.0, "lambda_min": 5.0}}


def tiny_config(head: str = "softmax", **kw) -> TrainConfig:
    base = dict(
        model="lenetpp",
        head=head,
        dataset="fake",
        embedding_dim=8,
        model_options=dict(TINY),
        head_options=dict(STEADY.get(head, {})),
        epochs=1,
        batch_size=32,
        optimizer="adamw",
        lr=3e-3,
        limit=128,
        test_limit=200,
        device="cpu",
        eval_metrics=("retrieval",),
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("head", sorted(BUILTIN_HEADS))
def test_each_builtin_head_learns(head, tmp_path):
    result = train(tiny_config(head, epochs=3, limit=256), tmp_path / head, progress=False)
    losses = [h["loss"] for h in result.history]
    assert result.status == "completed" and len(losses) == 3
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], f"{head}: loss did not go down: {losses}"


def test_run_directory_contents_and_checkpoint_round_trip(tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config("arcface", epochs=2, head_options={"scale": 16.0, "margin": 0.2}), out, progress=False)
    for name in ("run.json", "config.json", "model.safetensors", "metrics.jsonl", "eval.json", "resume.json"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert {"loss", "train_accuracy", "test_accuracy", "time", "images_per_s"} <= set(lines[0])
    ev = json.loads((out / "eval.json").read_text())
    assert ev["samples"] == 200 and "precision_at_1" in ev["metrics"]
    assert json.loads((out / "run.json").read_text())["status"] == "completed"

    loaded = headreg.load_model(out)
    assert loaded.config["head"] == "arcface" and loaded.num_classes == 10
    x = torch.randn(5, 1, 28, 28)
    result.model.eval()
    torch.testing.assert_close(loaded.embed(x), result.model.embed(x), rtol=0, atol=0)
    # The final evaluation's embeddings are the loaded model's on the same test images.
    assert result.embeddings.shape == (200, 8)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("head", ["center", "sphereface"])
def test_resume_gives_the_same_next_step(head, tmp_path):
    # Two epochs of 4 steps, augmentation on (its RNG must be restored), SGD with momentum (its buffers too),
    # and a head with state that advances per step (centres / the SphereFace step counter).
    cfg = dict(epochs=2, optimizer="sgd", lr=0.05, augment=True, head_options={})
    full = train(tiny_config(head, **cfg), tmp_path / "full", progress=False)
    assert full.global_step == 8

    stopped = train(tiny_config(head, **cfg), tmp_path / "part", stop_after_steps=5, progress=False)
    assert stopped.status == "stopped" and stopped.global_step == 5
    assert json.loads((tmp_path / "part" / "run.json").read_text())["status"] == "stopped"
    # Stopped one step short of ... then resume: the next steps land exactly where the uninterrupted run did.
    one_more = resume(tmp_path / "part", stop_after_steps=6, progress=False)
    assert one_more.global_step == 6
    again = resume(tmp_path / "part", progress=False)
    assert again.status == "completed" and again.global_step == 8
    a, b = _weights(full.model), _weights(again.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    hist_full = [h["loss"] for h in full.history]
    hist_resumed = [json.loads(x)["loss"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert hist_resumed == pytest.approx(hist_full, rel=1e-9)


def test_ctrl_c_stops_cleanly_and_resumes_exactly(tmp_path):
    cfg = dict(epochs=1, limit=192, optimizer="sgd", lr=0.05)
    full = train(tiny_config("cosface", **cfg), tmp_path / "full", progress=False)

    def press_ctrl_c(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(tiny_config("cosface", **cfg), tmp_path / "part", on_step=press_ctrl_c, progress=False)
    assert stopped.status == "stopped" and stopped.global_step == 3
    assert not (tmp_path / "part" / "eval.json").exists()
    done = resume(tmp_path / "part", progress=False)
    assert done.global_step == full.global_step == 6
    for k, v in _weights(full.model).items():
        assert torch.equal(v, done.model.state_dict()[k]), k


def test_margin_feasibility_bounds():
    # CosFace: m < 1 − cos(2π/C); ArcFace: m < 2π/C, in 2-D with C classes.
    assert margin_feasibility("cosface", {"margin": 0.18}, 2, 10) == []
    assert "0.191" in margin_feasibility("cosface", {"margin": 0.35}, 2, 10)[0]
    assert margin_feasibility("arcface", {"margin": 0.6}, 2, 10) == []
    assert margin_feasibility("arcface", {"margin": 0.63}, 2, 10)
    assert margin_feasibility("arcface", {}, 2, 10) == []  # default 0.5 < 0.628
    assert margin_feasibility("cosface", {}, 2, 10)  # default 0.35 is infeasible in 2-D
    assert margin_feasibility("cosface", {}, 128, 10) == []  # simplex: 1 − cos(arccos(−1/9)) = 1.11
    assert margin_feasibility("combined", {}, 2, 10)  # cos(0.3) − 0.2 = 0.755 < cos 36° = 0.809
    assert margin_feasibility("softmax", {}, 2, 10) == []


def test_infeasible_margin_warns_in_train(tmp_path):
    with pytest.warns(MarginFeasibilityWarning, match="cannot be met"):
        train(tiny_config("cosface", embedding_dim=2, head_options={"margin": 0.35}), tmp_path / "r", progress=False)


def _cli(args, tmp_path):
    return CliRunner().invoke(main, ["train", *args])


CLI_BASE = ["--model", "lenetpp", "--dataset", "fake", "--model-option", "widths=[4,8,8]", "--epochs", "1",
            "--batch-size", "32", "--limit", "64", "--test-limit", "100", "--device", "cpu",
            "--no-progress"]  # fmt: skip


def test_cli_trains_and_warns_about_infeasible_margin(tmp_path):
    out = tmp_path / "cos"
    r = _cli([*CLI_BASE, "--head", "cosface", "--embedding-dim", "2", "--head-option", "margin=0.35",
              "--head-option", "scale=16", "--out", str(out)], tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning: cosface margin=0.35 cannot be met" in r.output
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert cfg["head_options"] == {"margin": 0.35, "scale": 16} and cfg["model_options"] == {"widths": [4, 8, 8]}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--head", "arcfce"], "unknown head 'arcfce'; did you mean 'arcface'"),
        (["--head", "arcface", "--dataset", "mnst"], "unknown dataset 'mnst'"),
        (["--head", "arcface", "--num-classes", "5"], "labels up to 9"),
        (["--head", "arcface", "--head-option", "margin"], "--head-option must look like key=value"),
        (["--head", "arcface", "--head-option", "margn=0.2"], "has no option 'margn'"),
        (["--head", "arcface", "--batch-size", "1000"], "larger than the 64 training samples"),
        (["--head", "arcface", "--model", "resnet1"], "unknown backbone 'resnet1'"),
        (["--head", "softmax", "--head-warmup", "scale=1:0.5"], "head 'softmax' cannot warm up 'scale'"),
        (["--head", "arcface", "--head-warmup", "margin=0.5"], "--head-warmup must look like NAME=START:FRACTION"),
        (["--head", "arcface", "--head-warmup", "margin=0:1.5"], "fraction of the run must be in (0, 1]"),
        (["--head", "arcface", "--head-warmup", "margin=4:0.5"], "margin must be"),
        (["--head", "arcface", "--head-lr-scale", "0"], "head_lr_scale must be a finite number > 0"),
    ],
)
def test_cli_bad_input_is_a_clean_error(args, message, tmp_path):
    base = list(CLI_BASE)
    if "--dataset" in args:
        i = base.index("--dataset")
        del base[i : i + 2]
    if "--model" in args:
        i = base.index("--model")
        del base[i : i + 2]
    r = _cli([*base, *args, "--out", str(tmp_path / "r")], tmp_path)
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output


def test_cli_missing_options(tmp_path):
    r = _cli(["--head", "arcface"], tmp_path)
    assert r.exit_code != 0 and "needs --model, --dataset, --out" in r.output


def test_labels_beyond_num_classes_rejected(tmp_path):
    with pytest.raises(InvalidValueError, match=r"labels must lie in \[0, num_classes\)"):
        train(tiny_config(num_classes=3), tmp_path / "r", progress=False)
    with pytest.warns(UserWarning, match="will never see a sample"):
        train(tiny_config(num_classes=12), tmp_path / "r2", progress=False)


def test_existing_run_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    r = _cli([*CLI_BASE, "--head", "softmax", "--out", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    r = _cli([*CLI_BASE, "--head", "normface", "--out", str(out)], tmp_path)
    assert r.exit_code != 0 and "already holds a different run" in r.output and "head: 'softmax'" in r.output
    r = _cli([*CLI_BASE, "--head", "softmax", "--out", str(out)], tmp_path)
    assert r.exit_code != 0 and "already holds this run" in r.output
    r = _cli([*CLI_BASE, "--head", "normface", "--out", str(out), "--overwrite"], tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run.json").read_text())["config"]["head"] == "normface"
    # A directory with someone else's files is never a run to overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = _cli([*CLI_BASE, "--head", "softmax", "--out", str(other), "--overwrite"], tmp_path)
    assert r.exit_code != 0 and "not a headreg run" in r.output
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_resume_after_max_steps(tmp_path):
    out = tmp_path / "run"
    r = _cli([*CLI_BASE, "--head", "softmax", "--out", str(out), "--max-steps", "1"], tmp_path)
    assert r.exit_code == 0 and "--resume" in r.output, r.output
    r = _cli(["--resume", str(out), "--no-progress"], tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run.json").read_text())["global_step"] == 2
    r = _cli(["--resume", str(tmp_path / "nothing")], tmp_path)
    assert r.exit_code != 0 and "holds no run.json" in r.output


def test_parse_key_values():
    from headreg.cli.train import parse_key_values

    got = parse_key_values(["scale=30", "margin=0.2", "learn-scale=true", "widths=[16,32]", "name=x", "n=None"], "-o")
    assert got == {"scale": 30, "margin": 0.2, "learn_scale": True, "widths": [16, 32], "name": "x", "n": None}


def test_head_warmup_ramps_then_restores_the_configured_values(tmp_path, monkeypatch):
    # 1 epoch of 4 steps, scale 1 -> 16 over the first half, margin 0 -> 0.2 over the whole run.
    seen = []
    cfg = tiny_config(
        "arcface",
        head_options={"scale": 16.0, "margin": 0.2},
        head_warmup={"scale": [1.0, 0.5], "margin": [0.0, 1.0]},
    )
    box = {}

    def record(step: int) -> None:
        head = box["run"].model.head if "run" in box else None
        if head is not None:
            seen.append((step, head.scale, head.margin))

    from headreg.engine import _runner

    original = _runner.Run.execute

    def execute(self, *args, **kwargs):  # keep a handle on the run to read its head during training
        box["run"] = self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_runner.Run, "execute", execute)
    result = train(cfg, tmp_path / "r", on_step=record, progress=False)
    # on_step runs after step `step` (1-based) was taken with the values of global step `step - 1`.
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    assert [v for _, v, _ in seen] == pytest.approx([1.0, 8.5, 16.0, 16.0])
    assert [m for _, _, m in seen] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert result.model.head.scale == 16.0 and result.model.head.margin == pytest.approx(0.2)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["head_warmup"] == {
        "scale": [1.0, 0.5],
        "margin": [0.0, 1.0],
    }


def test_warmup_value_is_linear_then_flat():
    from headreg.engine._optim import warmup_value

    values = [warmup_value(1.0, 16.0, 0.5, step, 10) for step in range(11)]
    assert values[:6] == pytest.approx([1.0, 4.0, 7.0, 10.0, 13.0, 16.0])
    assert values[6:] == [16.0] * 5


def test_head_lr_scale_speeds_up_the_head_and_the_embedding_layer():
    from headreg.engine._optim import build_optimizer, set_lr

    model = headreg.create_model(
        "lenetpp_bn", head="arcface", num_classes=10, embedding_dim=2, widths=[4, 8, 8], hidden_dim=16,
        feature_bn=True, embed_bias=False,
    )  # fmt: skip
    opt = build_optimizer(model, "adamw", 1e-3, 5e-4, head_lr_scale=10.0)
    set_lr(opt, 2e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    fast = {id(model.head.weight), id(model.embedding_layer().weight)}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(2e-2 if id(p) in fast else 2e-3), name
    assert model.embedding_layer() is model.backbone.module.embed
    plain = build_optimizer(model, "adamw", 1e-3, 5e-4)
    assert {g["lr_scale"] for g in plain.param_groups} == {1.0}


def test_resume_is_exact_with_warmup_and_head_lr_scale(tmp_path):
    cfg = dict(
        epochs=2,
        optimizer="sgd",
        lr=0.05,
        head_options={"scale": 16.0, "margin": 0.1},
        head_lr_scale=5.0,
        head_warmup={"scale": [1.0, 0.7], "margin": [0.0, 0.5]},
    )
    full = train(tiny_config("cosface", **cfg), tmp_path / "full", progress=False)
    stopped = train(tiny_config("cosface", **cfg), tmp_path / "part", stop_after_steps=3, progress=False)
    assert stopped.status == "stopped" and stopped.model.head.scale == 16.0  # restored on stop too
    done = resume(tmp_path / "part", progress=False)
    assert done.global_step == full.global_step == 8
    for k, v in _weights(full.model).items():
        assert torch.equal(v, done.model.state_dict()[k]), k


# ------------------------------------------------------------------ one inference pass: train and eval agree


def _eval_top1(out, *extra: str) -> float:
    args = ["eval", "--checkpoint", str(out), "--dataset", "fake", "--limit", "200", "--metrics", "classification",
            "--device", "cpu", "--json", "--no-progress", *extra]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["metrics"]["top1_accuracy"]


@pytest.mark.parametrize("amp", [None, True], ids=["fp32", "bf16"])
def test_train_test_accuracy_is_eval_top1(amp, tmp_path):
    # Training evaluates with headreg's one inference pass, at the precision `headreg eval` uses for the same
    # --amp setting (on the CPU: float32 by default, bf16 + channels_last with --amp), so the numbers are equal.
    out = tmp_path / "run"
    cfg = tiny_config("arcface", amp=amp, head_options={"scale": 16.0, "margin": 0.2}, test_limit=200)
    result = train(cfg, out, progress=False)
    top1 = _eval_top1(out, *(["--amp"] if amp else []))
    assert result.test_accuracy == top1
    assert json.loads((out / "eval.json").read_text())["test_accuracy"] == top1
    assert result.history[-1]["test_accuracy"] == top1
    # The model trains on in its own memory layout after a channels_last evaluation.
    assert all(p.is_contiguous() for p in result.model.parameters())


def test_tied_logits_count_as_hits_in_train_and_eval(tmp_path, monkeypatch):
    # After the last step the softmax head's weights are zeroed and its bias made [1, 1, 0, ...]: every sample's
    # logits are exactly the bias, so classes 0 and 1 tie for first place. Ties count as hits (docs/metrics.md):
    # labels 0 and 1 are top-1 hits, where an argmax (ties to the lowest index) would hit label 0 only.
    from headreg.engine import _runner

    box = {}
    original = _runner.Run.execute

    def execute(self, *args, **kwargs):
        box["run"] = self
        return original(self, *args, **kwargs)

    def tie(step: int) -> None:
        if step == 4:  # the last of 1 epoch x 4 steps
            head = box["run"].model.head
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
                head.bias[:2] = 1.0

    monkeypatch.setattr(_runner.Run, "execute", execute)
    out = tmp_path / "run"
    result = train(tiny_config("softmax", test_limit=200), out, on_step=tie, progress=False)
    expected = float(((result.labels == 0) | (result.labels == 1)).double().mean())
    assert 0 < expected < 1 and bool((result.labels == 1).any())
    assert result.test_accuracy == expected == _eval_top1(out)
