"""Training stability: the per-step non-finite guard, gradient clipping and gradient accumulation.

NaN is forced in two ways: a training set whose images hold NaN (a dataset wrapper below), and a head
with an absurd logit scale. The guard is also driven directly, step by step, to check what a skipped
step leaves untouched (weights, optimiser moments, batch-norm statistics) and the float16 GradScaler path
(which runs on CPU tensors; the engine itself trains float16 only on GPUs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _dist import free_port
from click.testing import CliRunner
from torch import nn

import headreg
import headreg.heads.base as heads_base
from headreg.cli import main
from headreg.data import ImageFolderDataset
from headreg.engine._guard import NonFiniteStop, StepGuard
from headreg.engine.train import TrainConfig, resume, train
from headreg.errors import HeadregError, InvalidValueError
from headreg.heads.base import HeadOutput

N_TRAIN = 128  # 4 steps of 32 per epoch


def config(**kw) -> TrainConfig:
    base = dict(
        model="lenetpp", head="arcface", dataset="fake", embedding_dim=4, model_options={"widths": [4, 8, 8]},
        epochs=2, batch_size=32, optimizer="adamw", lr=3e-3, test_limit=64, device="cpu", eval_metrics=(),
        augment=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


class NaNImages(ImageFolderDataset):
    """The first ``n`` images of a headreg dataset, as float images; those at the indices in ``poisoned`` are NaN,
    and all of them once the file ``switch`` exists (a file, so that DataLoader worker processes see it too)."""

    def __init__(self, base, n: int, switch: Path) -> None:  # no folder: the images come from ``base``
        self.base, self.n, self.switch = base, n, switch
        self.name, self.classes = "nan-images", list(base.classes)  # num_classes: len(classes)
        self.targets = base.targets[:n].clone()
        self.transform = None
        self.poisoned: set[int] = set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = self.base.images[i].float() / 255.0
        bad = i in self.poisoned or self.switch.exists()
        return (torch.full_like(x, math.nan) if bad else x), int(self.targets[i])


@pytest.fixture
def nan_data(monkeypatch, tmp_path: Path):
    """``create_dataset(..., "train")`` gives a :class:`NaNImages`: ``made["poison"]`` poisons those indices,
    creating ``made["switch"]`` poisons every image from then on."""
    import headreg.data as data

    real = data.create_dataset
    made: dict = {"switch": tmp_path / "poison-all", "poison": set()}

    def create(name, split, **kw):
        ds = real(name, split, **kw)
        if split == "train":
            ds = NaNImages(ds, N_TRAIN, made["switch"])
            ds.poisoned |= made["poison"]
        return ds

    monkeypatch.setattr(data, "create_dataset", create)
    return made


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())


# ------------------------------------------------------------------------------------------ through training
def test_transient_nan_batches_are_skipped_counted_and_the_run_goes_on(nan_data, tmp_path: Path) -> None:
    nan_data["poison"] = {5}  # one sample: one bad batch in each epoch
    lines: list[str] = []
    result = train(config(model="lenetpp_bn"), tmp_path / "run", progress=False, log=lines.append)
    assert result.status == "completed" and result.global_step == 8
    assert [h["skipped_steps"] for h in result.history] == [1, 1]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    # the skipped batch's samples are not counted; the NaN batch left no trace in the BN statistics either
    assert _finite(result.model) and bool(torch.isfinite(result.embeddings).all())
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped_steps"] for x in logged] == [1, 1]
    assert any("skipped: non-finite values in the input batch" in x for x in lines), lines


def test_consecutive_bad_steps_stop_and_the_last_state_resumes(nan_data, tmp_path: Path) -> None:
    def poison_after_epoch_1(step: int) -> None:
        if step == 4:
            nan_data["switch"].touch()

    out = tmp_path / "run"
    with pytest.raises(NonFiniteStop) as err:
        train(config(max_bad_steps=3), out, progress=False, on_step=poison_after_epoch_1)
    msg = str(err.value)
    assert "3 consecutive steps were non-finite" in msg and "(steps 5-7)" in msg
    assert "the input batch, at step 5 (float32, no loss scaling)" in msg
    assert "last resumable state (epoch 1, step 4) is kept" in msg and f"--resume {out}" in msg
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"

    nan_data["switch"].unlink()
    # The data fixed, the run resumes from the state committed at the end of epoch 1 and ends as a run
    # that never met the NaN batches.
    resumed = resume(out, progress=False)
    assert resumed.status == "completed" and resumed.global_step == 8
    assert [h["epoch"] for h in resumed.history] == [1, 2] and resumed.history[-1]["skipped_steps"] == 0
    clean = train(config(max_bad_steps=3), tmp_path / "clean", progress=False)
    for (name, a), b in zip(resumed.model.state_dict().items(), clean.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_an_absurd_head_scale_stops_the_run_naming_the_loss(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(heads_base, "MAX_SCALE", 1e39)  # the head refuses such a scale otherwise
    with pytest.warns(UserWarning, match="far above"), pytest.raises(NonFiniteStop) as err:
        train(config(head_options={"scale": 1e38}, max_bad_steps=2), tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "(steps 1-2)" in msg and "was the loss, at step 1" in msg
    assert "No resumable state was saved yet" in msg


def test_a_gradient_norm_that_overflows_is_named(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(heads_base, "MAX_SCALE", 1e39)
    with pytest.warns(UserWarning, match="far above"), pytest.raises(NonFiniteStop, match="total gradient norm"):
        train(config(head_options={"scale": 1e30}, max_bad_steps=1), tmp_path / "run", progress=False)


def test_without_the_guard_the_running_loss_check_still_stops_the_run(nan_data, tmp_path: Path) -> None:
    nan_data["switch"].touch()
    with pytest.raises(HeadregError, match="the training loss became nan by step 4"):
        train(config(max_bad_steps=0, epochs=1), tmp_path / "run", progress=False)


# ------------------------------------------------------------------------------------------ the guard, step by step
class Tiny(nn.Module):
    """Linear → BatchNorm → a mean-reduced loss; returns what a HeadModel's training forward returns."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> HeadOutput:
        emb = self.bn(self.fc(x))
        logits = emb * 2
        return HeadOutput(loss=logits.square().mean(), logits=logits, embeddings=emb)


def _step(model, guard, opt, x, scaler=None, step=1) -> bool:
    opt.zero_grad(set_to_none=True)
    guard.begin()
    out = model(x)
    (scaler.scale(out.loss) if scaler is not None else out.loss).backward()
    guard.observe(x, out)
    return guard.step(opt, scaler, step)


def _snapshot(model, opt) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in enumerate(opt.state.values()):
        state.update({f"opt{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
    return state


def test_a_skipped_step_leaves_weights_moments_and_bn_statistics_untouched() -> None:
    model = Tiny().train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = StepGuard(model, max_bad_steps=2)
    assert _step(model, guard, opt, torch.randn(8, 3))
    before = _snapshot(model, opt)
    bad = torch.randn(8, 3)
    bad[2, 1] = math.nan
    assert not _step(model, guard, opt, bad, step=2)
    after = _snapshot(model, opt)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)  # AdamW's step count included
    assert guard.streak == 1 and all(p.grad is None for p in model.parameters())
    assert _step(model, guard, opt, torch.randn(8, 3), step=3) and guard.streak == 0  # a good step resets it
    assert not _step(model, guard, opt, bad, step=4)
    with pytest.raises(
        NonFiniteStop, match=r"\(steps 4-5\)\. The first non-finite tensor was the input batch, at step 4"
    ):
        _step(model, guard, opt, bad, step=5)


def test_the_guard_names_the_parameter_whose_gradient_is_not_finite() -> None:
    model = Tiny().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(model, max_bad_steps=1)
    model.fc.bias.register_hook(lambda g: g * math.inf)
    with pytest.raises(NonFiniteStop, match="the gradient of 'fc.bias'"):
        _step(model, guard, opt, torch.randn(8, 3))


def test_float16_scaler_backs_off_on_a_skipped_step_and_clipping_sees_the_unscaled_gradient() -> None:
    model = Tiny().train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = StepGuard(model, max_bad_steps=3, clip_grad_norm=0.01, amp_dtype=torch.float16)
    w = [p.detach().clone() for p in model.parameters()]
    assert _step(model, guard, opt, torch.randn(8, 3), scaler=scaler)
    moved = torch.cat([(a - p.detach()).flatten() for a, p in zip(w, model.parameters(), strict=True)])
    torch.testing.assert_close(moved.norm(), torch.tensor(0.01), rtol=1e-4, atol=0)  # lr 1: update = clipped grad
    assert scaler.get_scale() == 1024.0
    bad = torch.full((8, 3), math.nan)
    lines: list[str] = []
    guard.log = lines.append
    assert not _step(model, guard, opt, bad, scaler=scaler, step=2)
    assert scaler.get_scale() == 512.0  # backed off, as GradScaler does on an inf/NaN gradient
    want = "step 2 skipped: non-finite values in the input batch (float16 autocast, AMP loss scale 1024)"
    assert lines == [f"{want}; weights unchanged"]


def test_clipping_without_the_guard() -> None:
    model = Tiny().train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    guard = StepGuard(model, max_bad_steps=0, clip_grad_norm=0.05)
    w = [p.detach().clone() for p in model.parameters()]
    assert _step(model, guard, opt, torch.randn(8, 3) * 10)
    moved = torch.cat([(a - p.detach()).flatten() for a, p in zip(w, model.parameters(), strict=True)])
    torch.testing.assert_close(moved.norm(), torch.tensor(0.05), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------ accumulation, clipping
def test_accumulation_equals_the_larger_batch(tmp_path: Path) -> None:
    """4 micro-batches of 16 take the step of one batch of 64 (a backbone without batch statistics, no dropout,
    no augmentation, a head whose loss is a batch mean)."""
    common = dict(epochs=1, limit=N_TRAIN, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    micro = train(config(batch_size=16, accumulate=4, **common), tmp_path / "micro", progress=False)
    large = train(config(batch_size=64, **common), tmp_path / "large", progress=False)
    assert micro.global_step == large.global_step == 2
    assert micro.history[0]["loss"] == pytest.approx(large.history[0]["loss"], rel=1e-5)
    for (name, a), b in zip(micro.model.state_dict().items(), large.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    untrained = train(config(batch_size=64, **common), tmp_path / "none", progress=False, stop_after_steps=0)
    pairs = zip(large.model.parameters(), untrained.model.parameters(), strict=True)
    moved = sum(float((a - b).detach().abs().sum()) for a, b in pairs)
    assert moved > 1e-3  # the comparison is between weights that trained


def test_accumulation_stops_and_resumes_between_steps_only(tmp_path: Path) -> None:
    kw = dict(epochs=1, limit=N_TRAIN, batch_size=16, accumulate=2)
    whole = train(config(**kw), tmp_path / "whole", progress=False)
    part = train(config(**kw), tmp_path / "part", progress=False, stop_after_steps=3)
    assert part.status == "stopped" and part.global_step == 3
    state = json.loads((tmp_path / "part" / "resume.json").read_text())["state"]["progress"]
    assert state["tally"]["batches"] == 6  # 3 steps of 2 micro-batches
    done = resume(tmp_path / "part", progress=False)
    assert done.global_step == whole.global_step == 4
    for (name, a), b in zip(done.model.state_dict().items(), whole.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_accumulate_larger_than_an_epoch_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidValueError, match="accumulate=8 needs that many batches per step"):
        train(config(limit=N_TRAIN, accumulate=8), tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("accumulate", 0, "accumulate must be an integer >= 1"),
        ("max_bad_steps", -1, "max_bad_steps must be an integer >= 0"),
        ("clip_grad_norm", 0.0, "clip_grad_norm must be a finite number > 0"),
        ("clip_grad_norm", math.inf, "clip_grad_norm must be a finite number > 0"),
    ],
)
def test_bad_stability_settings_are_refused(field, value, match) -> None:
    with pytest.raises(InvalidValueError, match=match):
        config(**{field: value})


def test_cli_options_reach_the_config(monkeypatch, tmp_path: Path) -> None:
    seen: dict = {}

    def fake_train(cfg: TrainConfig, out, **kwargs):
        seen["config"] = cfg
        raise InvalidValueError("stop here")

    monkeypatch.setattr(headreg.engine.train, "train", fake_train)
    args = ["train", "--model", "lenetpp", "--head", "arcface", "--dataset", "fake", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, [*args, "--clip-grad-norm", "2.5", "--accumulate", "4", "--max-bad-steps", "3"])
    assert "stop here" in r.output, r.output
    cfg = seen["config"]
    assert (cfg.clip_grad_norm, cfg.accumulate, cfg.max_bad_steps) == (2.5, 4, 3)
    r = CliRunner().invoke(main, [*args, "--accumulate", "0"])
    assert r.exit_code != 0 and "accumulate must be an integer >= 1" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------ under torchrun
@pytest.mark.slow
def test_two_gloo_processes_accumulate_freeze_and_guard_like_one(tmp_path: Path) -> None:
    """DDP with --accumulate (no_sync on the first micro-batch), --freeze-backbone (the model wrapped again
    when the backbone thaws), clipping and the guard (its verdict all-reduced each step) takes the steps one
    process takes with the same global batch (LeNet++ without batch norm, no augmentation)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["--model", "lenetpp", "--model-option", "widths=[4,8,8]", "--head", "arcface", "--dataset", "fake",
            "--embedding-dim", "4", "--epochs", "2", "--batch-size", "16", "--accumulate", "2", "--limit", "128",
            "--test-limit", "64", "--optimizer", "sgd", "--lr", "0.05", "--no-augment", "--device", "cpu",
            "--no-progress", "--freeze-backbone", "1", "--clip-grad-norm", "5"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "headreg", "train", *args, "--out", str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(ddp, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = [sys.executable, "-m", "headreg", "train", *args, "--out", str(tmp_path / "one")]
    proc = subprocess.run(one, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["global_step"] == 8 and run["replica_max_abs_diff"] == 0.0
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
