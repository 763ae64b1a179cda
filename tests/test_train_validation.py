"""Validation during training (``--val``, ``--val-every``, ``--keep-best``, ``--early-stop``) and ``--tensorboard``.

The validation runs ``headreg eval``'s code path, so ``headreg eval --checkpoint RUN/best`` on the same set must
report exactly the numbers of the validation that kept ``best/``.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_pairs_data import jpeg
from test_train import tiny_config

from headreg.cli import main
from headreg.engine._valspec import higher_is_better, parse_every, parse_protocols, parse_val, split_best
from headreg.engine.train import TrainConfig, resume, train
from headreg.errors import DatasetNotFoundError, InvalidValueError


def write_small_bin(path: Path, num_pairs: int = 20) -> Path:
    """An insightface-layout .bin of 28x28 JPEGs (LeNet++'s input size), same/different alternating."""
    images = [jpeg(i, 28) for i in range(2 * num_pairs)]
    path.write_bytes(pickle.dumps((images, [p % 2 == 0 for p in range(num_pairs)]), protocol=4))
    return path


def val_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val" in r]


# ---------------------------------------------------------------------------------------------- the option texts
def test_val_texts_parse_and_refuse_clearly():
    assert parse_val(["lfw.bin, mnist@test", "sop@test/train"]) == ("lfw.bin", "mnist@test", "sop@test/train")
    lfw, mnist, sop, folder = parse_protocols(["faces/lfw.bin", "mnist@test", "sop@test/train", "imagefolder:/d@val"])
    assert (lfw.key, lfw.bin_path, lfw.dataset) == ("lfw", "faces/lfw.bin", None)
    assert (mnist.dataset, mnist.split, mnist.gallery_split) == ("mnist", "test", None)
    assert (sop.split, sop.gallery_split) == ("test", "train")
    assert (folder.dataset, folder.split) == ("imagefolder:/d", "val")
    assert parse_protocols(["fake"])[0].split == "test"
    assert parse_every(2) == (2, "epoch") and parse_every("3epochs") == (3, "epoch")
    assert parse_every("500steps") == (500, "step") and parse_every("1 step") == (1, "step")
    assert split_best("precision_at_1", ["mnist@test"]) == ("mnist@test", "precision_at_1")
    assert split_best("sop@test/train/recall_at_1", ["sop@test/train", "lfw"]) == ("sop@test/train", "recall_at_1")
    assert split_best("csv:/d/x.csv/shoes/recall_at_1", ["csv:/d/x.csv", "lfw"]) == (
        "csv:/d/x.csv",
        "shoes/recall_at_1",
    )
    assert split_best("shoes/recall_at_1", ["csv:x.csv"]) == ("csv:x.csv", "shoes/recall_at_1")
    assert higher_is_better("kfold_accuracy") and not higher_is_better("eer")
    for bad, match in [
        (lambda: parse_every("0"), "positive count"),
        (lambda: parse_every("5minutes"), "500steps"),
        (lambda: parse_protocols(["lfw.bin", "x/lfw.bin"]), "twice"),
        (lambda: parse_protocols(["mnist@"]), "nothing after '@'"),
        (lambda: split_best("precision_at_1", ["a", "b"]), "SET/METRIC"),
        (lambda: split_best("c/precision_at_1", ["a", "b"]), "'c' is not one of them"),
        (lambda: tiny_config(keep_best="precision_at_1"), "give --val too"),
        (lambda: tiny_config(val=("fake",), early_stop=2), "--keep-best"),
        (lambda: tiny_config(val_every="2steps"), "needs --val"),
        (lambda: tiny_config(val=("fake",), keep_best="p", early_stop=0), "positive number"),
    ]:
        with pytest.raises(InvalidValueError, match=match):
            bad()
    cfg = tiny_config(val=("fake@test,lfw.bin",), val_every="4 steps", keep_best="lfw/kfold_accuracy")
    assert cfg.val == ("fake@test", "lfw.bin") and cfg.val_every == "4steps"
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # run.json round trip


# ---------------------------------------------------------------------------------------------- same numbers as eval
def test_best_checkpoint_gives_headreg_eval_the_validation_numbers(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lfw = write_small_bin(data / "lfw.bin")
    out = tmp_path / "run"
    cfg = tiny_config(
        "arcface", epochs=2, val=("fake@test", "lfw.bin"), data_dir=str(data),
        keep_best="fake@test/mean_average_precision_at_r", head_options={"scale": 16.0, "margin": 0.2},
    )  # fmt: skip
    result = train(cfg, out, progress=False)
    lines = val_lines(out)
    assert [(r["epoch"], r["step"]) for r in lines] == [(1, 4), (2, 8)]  # every epoch by default
    assert result.validations == lines
    best = max(lines, key=lambda r: r["val"]["fake@test"]["mean_average_precision_at_r"])
    assert (
        lines[-1]["best"]["step"] == best["step"]
        and lines[-1]["best"]["metric"] == "fake@test/mean_average_precision_at_r"
    )
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["metadata"]["step"] == best["step"]

    def evaluate(*args: str) -> dict:
        res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out / "best"), *args, "--json", "--no-progress"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["metrics"]

    retrieval = evaluate("--dataset", "fake", "--split", "test", "--metrics", "retrieval")  # the run's eval_metrics
    assert retrieval == best["val"]["fake@test"]
    assert evaluate("--dataset", f"bin:{lfw}") == best["val"]["lfw"]
    # --overwrite takes best/ away with the rest of the run.
    train(tiny_config(epochs=1), out, overwrite=True, progress=False)
    assert not (out / "best").exists() and val_lines(out) == []


def test_csv_validation_set_with_roles_and_categories_matches_headreg_eval(tmp_path):
    from _retrieval_layouts import write_csv

    csv = write_csv(tmp_path / "oml")  # validation rows: 4 classes, query -> gallery roles, two categories
    out = tmp_path / "run"
    cfg = tiny_config(epochs=1, val=(f"csv:{csv}",), input_size=28, keep_best="bags/precision_at_1")
    result = train(cfg, out, progress=False)
    (line,) = result.validations
    values = line["val"][f"csv:{csv}"]
    assert line["best"]["metric"] == f"csv:{csv}/bags/precision_at_1" and "shoes/precision_at_1" in values
    res = CliRunner().invoke(
        main, ["eval", "--checkpoint", str(out / "best"), "--dataset", f"csv:{csv}", "--input-size", "28",
               "--metrics", "retrieval", "--json", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"] == values


def test_step_counted_validation_and_the_last_step(tmp_path, monkeypatch):
    from headreg.engine._validate import Validator

    run = Validator.run

    def slow_run(self, *args):  # a validation that takes 2 s: none of it may count as training time
        time.sleep(2.0)
        return run(self, *args)

    monkeypatch.setattr(Validator, "run", slow_run)
    result = train(tiny_config(epochs=2, val=("fake",), val_every="3steps"), tmp_path / "run", progress=False)
    assert [(r["epoch"], r["step"]) for r in result.validations] == [(1, 3), (2, 6), (2, 8)]  # 8: the last step
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert "best" not in result.validations[0]
    assert all(h["time"] < 1.9 for h in result.history), result.history


# ---------------------------------------------------------------------------------------------- early stop, resume
def test_early_stop_ends_mid_epoch_says_why_and_stays_ended(tmp_path):
    out = tmp_path / "run"
    said: list[str] = []
    # A count never improves after the first validation: patience 1 ends the run at the second one (step 6).
    cfg = tiny_config(epochs=3, val=("fake",), val_every="3steps", keep_best="num_queries", early_stop=1)
    result = train(cfg, out, progress=False, log=said.append)
    assert result.status == "completed" and result.global_step == 6
    assert result.early_stop is not None and "has not improved for 1 validation" in result.early_stop
    assert any(line.startswith("early stop at epoch 2, step 6") and "best" in line for line in said)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed" and record["early_stop"] == result.early_stop
    assert val_lines(out)[-1]["early_stop"] == result.early_stop
    assert [h["epoch"] for h in result.history] == [1, 2]  # the partial epoch is recorded
    assert (out / "eval.json").is_file() and (out / "best" / "model.safetensors").is_file()
    again = resume(out, progress=False, log=said.append)
    assert again.global_step == 6 and again.early_stop == result.early_stop
    assert any("nothing left to train" in line for line in said)


def test_resume_keeps_best_and_patience_exactly(tmp_path):
    cfg = dict(epochs=2, val=("fake",), val_every="3steps", keep_best="precision_at_1", early_stop=5)
    whole = train(tiny_config(**cfg), tmp_path / "whole", progress=False)
    part = train(tiny_config(**cfg), tmp_path / "part", stop_after_steps=5, progress=False)
    assert part.status == "stopped" and [r["step"] for r in part.validations] == [3]
    state = json.loads((tmp_path / "part" / "resume.json").read_text())["state"]["validation"]
    assert state["last_step"] == 3 and state["best_step"] == 3
    done = resume(tmp_path / "part", progress=False)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "val_time"} for r in rows]

    assert strip(done.validations) == strip(whole.validations)
    a, b = (
        load_file(str(tmp_path / "whole/best/model.safetensors")),
        load_file(str(tmp_path / "part/best/model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_drops_validation_lines_after_the_committed_step(tmp_path):
    from headreg.engine._epochlog import EpochLog
    from headreg.engine._rundir import RunDir

    run = RunDir(tmp_path)
    rows = [{"epoch": 1, "step": 4, "loss": 1.0, "time": 1.0}, {"epoch": 1, "step": 4, "val": {"a": {"m": 0.5}}},
            {"epoch": 2, "step": 6, "val": {"a": {"m": None}}}, {"epoch": 2, "step": 8, "loss": 0.5, "time": 1.0},
            {"epoch": 2, "step": 8, "val": {"a": {"m": 0.7}}}]  # fmt: skip
    for r in rows:
        run.append_metrics(r)
    log = EpochLog(run, 3, main=True, progress=False, log=None)
    log.resume_at(1, 6)  # a state committed at step 6, in epoch 2
    assert log.history == rows[:1] and log.validations == rows[1:3]
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:3]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 4, "val": {"a": {"m": "high"}}}\n')
    with pytest.raises(Exception, match=r"val\.a\.m must be a finite number"):
        run.read_metrics()


# ---------------------------------------------------------------------------------------------- the CLI
def _cli(*args: str) -> object:
    base = ["train", "--model", "lenetpp", "--model-option", "widths=[4,8,8]", "--head", "softmax", "--dataset",
            "fake", "--embedding-dim", "8", "--epochs", "1", "--batch-size", "32", "--limit", "64", "--test-limit",
            "100", "--device", "cpu", "--no-progress"]  # fmt: skip
    return CliRunner().invoke(main, [*base, *args])


def test_cli_validation_options_and_clean_errors(tmp_path):
    res = _cli("--val", "fake@test", "--val-every", "1steps", "--keep-best", "precision_at_1", "--early-stop", "9",
               "--out", str(tmp_path / "run"), "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in val_lines(tmp_path / "run")] == [1, 2]
    printed = json.loads(res.stdout)
    assert printed["validations"] == val_lines(tmp_path / "run") and printed["early_stop"] is None
    assert "validation at epoch 1, step 2: fake@test: precision_at_1" in res.stderr
    for args, message in [
        (("--val-every", "0"), "--val-every must be a positive count"),
        (("--val", "fake,fake@train", "--keep-best", "nope/precision_at_1"), "'nope' is not one of them"),
        (("--val", "fake", "--early-stop", "2"), "--early-stop watches the --keep-best metric"),
        (("--val", "missing.bin", "--data-dir", str(tmp_path)), "--val missing.bin: no such file"),
        (("--val", "fake", "--keep-best", "no_such_metric"), "reports no 'no_such_metric'"),
    ]:
        res = _cli(*args, "--out", str(tmp_path / "bad"), "--overwrite")
        assert res.exit_code != 0 and message in res.output, res.output
        assert "Traceback" not in res.output


def test_progress_bar_shows_the_last_validation(tmp_path, capsys):
    train(tiny_config(epochs=2, val=("fake",), keep_best="precision_at_1"), tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "epoch 2/2 [fake/precision_at_1 " in err, err[-2000:]


def test_missing_bin_is_refused_before_training(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="looked for"):
        train(tiny_config(val=("lfw.bin",), data_dir=str(tmp_path)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_writes_the_scalars_and_the_embeddings(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = tiny_config(
        "cosface", epochs=2, embedding_dim=2, val=("fake@test",), tensorboard=True, head_warmup={"scale": [1.0, 0.5]},
        head_options={"scale": 8.0, "margin": 0.1},
    )  # fmt: skip
    result = train(cfg, out, progress=False)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/lr", "train/loss", "train/accuracy", "test/accuracy", "perf/images_per_s", "head/scale",
                "val/fake@test/precision_at_1", "val/fake@test/recall_at_1"):  # fmt: skip
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in acc.Scalars("train/lr")] == list(range(1, 9))
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([h["loss"] for h in result.history])
    p1 = [e.value for e in acc.Scalars("val/fake@test/precision_at_1")]
    assert p1 == pytest.approx([r["val"]["fake@test"]["precision_at_1"] for r in result.validations])
    scale = [e.value for e in acc.Scalars("head/scale")]
    assert scale[0] < scale[-1] == pytest.approx(8.0)  # the warm-up ramp
    assert [e.step for e in acc.Images("embeddings/fake@test")] == [4, 8]  # 2-D: a scatter image per validation

    # Stopped (and committed) at step 5, then resumed: the events of step 5 stay, the continuation adds 6 to 8 once.
    out2 = tmp_path / "resumed"
    train(cfg, out2, stop_after_steps=5, progress=False)
    assert json.loads((out2 / "resume.json").read_text())["global_step"] == "5"
    resume(out2, progress=False)
    acc = EventAccumulator(str(out2 / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("train/lr")] == list(range(1, 9))  # each step once
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)


def test_tensorboard_projector_for_wide_embeddings(tmp_path):
    from headreg.engine._tensorboard import PROJECTOR_SAMPLES, Board

    board = Board(tmp_path, enabled=True)
    board._embeddings("sop@test", torch.randn(PROJECTOR_SAMPLES + 50, 16), torch.arange(PROJECTOR_SAMPLES + 50) % 7, 3)
    board.close()
    projector = (tmp_path / "tensorboard" / "projector_config.pbtxt").read_text()
    assert "sop@test" in projector
    tsv = next((tmp_path / "tensorboard").glob("00003/*/tensors.tsv"))
    assert len(tsv.read_text().splitlines()) == PROJECTOR_SAMPLES  # a capped sample


def test_tensorboard_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with pytest.raises(InvalidValueError, match=r"pip install 'headreg\[tensorboard\]'"):
        train(tiny_config(tensorboard=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    res = _cli("--tensorboard", "--out", str(tmp_path / "run"))
    assert res.exit_code != 0 and "pip install 'headreg[tensorboard]'" in res.output and "Traceback" not in res.output
