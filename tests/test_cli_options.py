"""The CLI's options: defaults and choices read from the engine, unset options dropped, --resume's warning."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner

import headreg.compare
import headreg.engine.evaluate
import headreg.engine.train
from headreg.cli import main
from headreg.cli._options import EngineOption, LazyChoice
from headreg.cli.compare import compare_cmd
from headreg.cli.eval import eval_cmd
from headreg.cli.train import train_cmd
from headreg.data import save_embeddings
from headreg.engine._optim import OPTIMIZERS, SCHEDULES
from headreg.engine.evaluate import KNN_BACKENDS
from headreg.engine.train import TrainConfig

TINY = ["--model", "lenetpp", "--dataset", "fake", "--model-option", "widths=[4,8,8]", "--epochs", "1",
        "--batch-size", "32", "--limit", "64", "--test-limit", "100", "--device", "cpu", "--no-progress"]  # fmt: skip


def _help(cmd: click.Command, name: str) -> dict[str, str]:
    """``{option name: its help text}`` as ``headreg NAME --help`` renders it."""
    ctx = click.Context(cmd, info_name=name)
    out = {}
    for p in cmd.params:
        record = p.get_help_record(ctx)
        if record is not None and p.name is not None:
            out[p.name] = record[1]
    return out


def _choices(cmd: click.Command, name: str) -> tuple[str, ...]:
    param = next(p for p in cmd.params if p.name == name)
    assert isinstance(param.type, LazyChoice)
    return tuple(param.type.choices)


def test_train_options_are_train_config_fields_or_run_parameters():
    """Each option feeds the engine parameter of its name, which is what --resume's warning relies on."""
    engine = {f.name for f in dataclasses.fields(TrainConfig)}
    engine |= set(inspect.signature(headreg.engine.train.train).parameters)
    engine |= set(inspect.signature(headreg.engine.train.resume).parameters)
    cli_only = {"resume_dir", "as_json"}
    assert {p.name for p in train_cmd.params if p.name != "help"} - engine == cli_only


def test_train_help_shows_the_dataclass_defaults():
    texts = _help(train_cmd, "train")
    for f in dataclasses.fields(TrainConfig):
        if f.name in texts and isinstance(f.default, (int, float, str)) and not isinstance(f.default, bool):
            assert f"[default: {f.default}]" in texts[f.name], f.name
    assert "[default: augment]" in texts["augment"]  # TrainConfig.augment is True
    assert "0.1 for sgd, 0.001 for adamw" in texts["lr"]
    assert "imagefolder:PATH" in texts["dataset"] and "mnist" in texts["dataset"]
    # Options that feed the engine leave their default to it (flag pairs included: not False).
    ctx = click.Context(train_cmd)
    for p in train_cmd.params:
        if isinstance(p, EngineOption):
            assert p.get_default(ctx) in (None, ()), p.name


def test_choices_are_the_engine_constants():
    assert _choices(train_cmd, "optimizer") == OPTIMIZERS
    assert _choices(train_cmd, "schedule") == SCHEDULES
    assert _choices(eval_cmd, "knn") == KNN_BACKENDS
    assert _choices(compare_cmd, "preset") == tuple(headreg.compare.PRESETS)
    texts = _help(eval_cmd, "eval")
    assert ",".join(headreg.engine.evaluate.ALL_METRICS) in texts["metrics"]
    assert "[default: 256; x>=1]" in texts["batch_size"]
    assert "[default: 1,2,4,8; sop 1,10,100,1000, inshop 1,10,20,30,40,50]" in texts["recall_k"]
    assert "[default: torch]" in texts["knn"]
    texts = _help(compare_cmd, "compare")
    assert ",".join(headreg.compare.DEFAULT_HEADS) in texts["heads"].replace(" ", "")
    assert "[default: quick]" in texts["preset"] and "[default: 2]" in texts["embedding_dim"]


def test_an_unknown_choice_is_a_clean_error(tmp_path: Path):
    r = CliRunner().invoke(main, ["train", *TINY, "--head", "softmax", "--optimizer", "adam", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "'adam' is not one of 'sgd', 'adamw'" in r.output


def test_unset_train_options_take_the_dataclass_defaults(monkeypatch, tmp_path: Path):
    seen: dict[str, Any] = {}

    def fake_train(config: TrainConfig, out: Any, **kwargs: Any) -> Any:
        seen.update(config=config, out=out, kwargs=kwargs)
        raise headreg.errors.InvalidValueError("stop here")

    monkeypatch.setattr(headreg.engine.train, "train", fake_train)
    args = ["train", "--model", "lenetpp", "--head", "arcface", "--dataset", "fake", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, args)
    assert "stop here" in r.output
    assert seen["config"] == TrainConfig(model="lenetpp", head="arcface", dataset="fake")
    assert seen["kwargs"] == {"overwrite": False}  # --max-steps and --progress left to train()'s defaults


def test_unset_eval_options_take_the_engine_defaults(monkeypatch, tmp_path: Path):
    seen: dict[str, Any] = {}
    real = headreg.engine.evaluate.evaluate_embeddings

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(headreg.engine.evaluate, "evaluate_embeddings", spy)
    f = save_embeddings(tmp_path / "e.safetensors", torch.randn(8, 3), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    r = CliRunner().invoke(main, ["eval", "--embeddings", str(f), "--json"])
    assert r.exit_code == 0, r.output
    assert not {"recall_k", "knn", "metrics"} & set(seen)  # the engine's own defaults applied
    assert "recall_at_8" in json.loads(r.stdout)["metrics"]
    r = CliRunner().invoke(main, ["eval", "--embeddings", str(f), "--recall-k", "1,3", "--knn", "torch", "--json"])
    assert r.exit_code == 0, r.output
    assert seen["recall_k"] == (1, 3) and seen["knn"] == "torch"


def test_unset_compare_options_take_the_engine_defaults(monkeypatch, tmp_path: Path):
    seen: dict[str, Any] = {}

    def fake_run_compare(heads: list[str], dataset: str, out: Any, **kwargs: Any) -> list[Any]:
        seen.update(heads=heads, dataset=dataset, kwargs=kwargs)
        return []

    monkeypatch.setattr(headreg.compare, "run_compare", fake_run_compare)
    r = CliRunner().invoke(main, ["compare", "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert seen["heads"] == list(headreg.compare.DEFAULT_HEADS) and seen["dataset"] == "mnist"
    # compare.json records device, seed and data_dir: TrainConfig's defaults when not given.
    assert seen["kwargs"]["overrides"] == {"device": "auto", "seed": 0, "data_dir": None}
    assert not {"embedding_dim", "preset", "progress"} & set(seen["kwargs"])
    r = CliRunner().invoke(main, ["compare", "--out", str(tmp_path), "--seed", "3", "--model", "lenetpp", "--json"])
    assert r.exit_code == 0, r.output
    assert seen["kwargs"]["overrides"] == {
        "device": "auto", "seed": 3, "data_dir": None, "model": "lenetpp", "model_options": {}
    }  # fmt: skip


def test_resume_names_every_option_it_ignores(tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(main, ["train", *TINY, "--head", "softmax", "--out", str(out), "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    before = json.loads((out / "run.json").read_text())["config"]
    ignored = ["--model", "lenetpp_bn", "--head", "arcface", "--dataset", "mnist", "--embedding-dim", "3",
               "--num-classes", "12", "--batch-size", "16", "--lr", "0.5", "--weight-decay", "0",
               "--optimizer", "adamw", "--momentum", "0.5", "--schedule", "step", "--warmup-epochs", "1",
               "--head-option", "scale=3", "--head-lr-scale", "2", "--head-warmup", "scale=1:0.5",
               "--model-option", "widths=[2,2,2]", "--no-amp", "--no-augment", "--seed", "7", "--limit", "10",
               "--test-limit", "10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x"),
               "--overwrite"]  # fmt: skip
    applied = ["--epochs", "1", "--device", "cpu", "--max-steps", "2", "--no-progress", "--json"]
    r = runner.invoke(main, ["train", "--resume", str(out), *ignored, *applied])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: --resume ignores")]
    assert len(warnings) == 1 and warnings[0].endswith(": the run's own settings are used"), r.stderr
    named = warnings[0].removeprefix("warning: --resume ignores ").split(":")[0].split(", ")
    assert named == [a for a in ignored if a.startswith("--")]
    assert json.loads((out / "run.json").read_text())["config"] == before
    assert json.loads(r.stdout)["history"][-1]["step"] == 2


def test_resume_without_ignored_options_does_not_warn(tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(main, ["train", *TINY, "--head", "softmax", "--out", str(out), "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["train", "--resume", str(out), "--device", "cpu", "--epochs", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "ignores" not in r.stderr


@pytest.mark.parametrize("command", ["train", "eval", "compare"])
def test_command_help_renders(command: str):
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0 and "[default:" in r.output, r.output
