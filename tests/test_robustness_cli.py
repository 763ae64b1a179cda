"""User mistakes end in one clear line, never a traceback; an internal error keeps its traceback and asks for a report.

Table-driven: each case is a command line (or an API call) built in ``tmp_path`` and the words the message
must hold. Plus the old run layout (``resume.json`` + ``resume.safetensors``) still resumes exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from headreg.cli import REPORT_BUG, main, run_cli
from headreg.engine.train import TrainConfig, resume, train
from headreg.errors import InvalidValueError

TRAIN = ["train", "--model", "lenetpp", "--head", "softmax", "--dataset", "fake", "--device", "cpu", "--no-progress"]
TINY = dict(
    model="lenetpp", head="softmax", dataset="fake", embedding_dim=8, model_options={"widths": [4, 8, 8]}, epochs=2,
    batch_size=32, optimizer="adamw", lr=3e-3, limit=64, test_limit=64, device="cpu", eval_metrics=(),
)  # fmt: skip
QUIET = dict(progress=False, log=lambda line: None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "run"
    train(TrainConfig(**TINY), out, **QUIET)
    return out


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root


# (case id, argv given tmp_path and the run directory, words the one-line error must hold)
CASES = [
    ("output under a file", lambda t, r: ["eval", "--checkpoint", str(r), "--dataset", "fake", "--output",
                                          str(t / "file" / "x.json")], ["--output", "is a file, not a folder"]),
    ("output onto a folder", lambda t, r: ["eval", "--checkpoint", str(r), "--dataset", "fake", "--output", str(t)],
     ["--output", "is a folder"]),
    ("plot under a file", lambda t, r: ["eval", "--checkpoint", str(r), "--dataset", "fake", "--plot",
                                        str(t / "file" / "p.png")], ["--plot", "is a file, not a folder"]),
    ("embeddings under a file", lambda t, r: ["eval", "--checkpoint", str(r), "--dataset", "fake",
                                              "--save-embeddings", str(t / "file" / "e.safetensors")],
     ["--save-embeddings", "is a file"]),
    ("train --out under a file", lambda t, r: [*TRAIN, "--out", str(t / "file" / "run")], ["file"]),
    ("compare --out under a file", lambda t, r: ["compare", "--heads", "softmax", "--dataset", "fake", "--out",
                                                 str(t / "file" / "cmp")], ["file"]),
    ("negative momentum", lambda t, r: [*TRAIN, "--momentum", "-1", "--out", str(t / "m")],
     ["momentum must be", "-1"]),
    ("negative weight decay", lambda t, r: [*TRAIN, "--weight-decay", "-0.1", "--out", str(t / "w")],
     ["weight_decay must be"]),
    ("input size too small", lambda t, r: ["eval", "--checkpoint", str(r), "--dataset", "fake", "--input-size", "4"],
     ["--input-size", "4x4"]),
    ("corrupt image, no workers", lambda t, r: ["eval", "--model", "resnet18", "--dataset",
                                                f"imagefolder:{_image_folder(t / 'imgs')}", "--workers", "0"],
     ["cannot read the image", "1.png"]),
    ("corrupt image, in a worker", lambda t, r: ["eval", "--model", "resnet18", "--dataset",
                                                 f"imagefolder:{_image_folder(t / 'imgs')}", "--workers", "1"],
     ["cannot read the image", "1.png"]),
]  # fmt: skip


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c[0] for c in CASES])
def test_user_mistakes_end_in_one_clear_line(case, argv, words, tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "file").write_text("a file where a folder is needed")
    r = CliRunner().invoke(main, argv(tmp_path, run_dir))
    assert r.exit_code in (1, 2), r.output
    assert isinstance(r.exception, SystemExit), f"{case}: {type(r.exception).__name__}: {r.exception}"
    assert "Traceback" not in r.output and REPORT_BUG not in r.output
    error = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, r.output
    for word in words:
        assert word in error[0], f"{case}: {word!r} not in {error[0]!r}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_a_read_only_folder_is_named(tmp_path: Path, run_dir: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = CliRunner().invoke(main, ["eval", "--checkpoint", str(run_dir), "--dataset", "fake", "--output",
                                      str(ro / "x.json")])  # fmt: skip
    finally:
        ro.chmod(0o700)
    assert r.exit_code == 2 and "no permission to write in" in r.output and "Traceback" not in r.output


def test_run_cli_converts_os_errors_and_flags_internal_ones(tmp_path: Path) -> None:
    @click.command()
    @click.argument("what")
    @run_cli
    def cmd(what: str) -> None:
        if what == "full":
            raise OSError(28, "No space left on device", str(tmp_path / "out.json"))
        if what == "usage":
            raise InvalidValueError("momentum must be >= 0, got -1")
        raise ZeroDivisionError("a bug")

    r = CliRunner().invoke(cmd, ["full"])
    assert (
        r.exit_code == 1
        and f"cannot use {tmp_path / 'out.json'}: No space left on device (the disk is full)" in r.stderr
    )
    r = CliRunner().invoke(cmd, ["usage"])
    assert r.exit_code == 1 and r.stderr.strip() == "Error: momentum must be >= 0, got -1"
    r = CliRunner().invoke(cmd, ["bug"])
    assert isinstance(r.exception, ZeroDivisionError)  # not converted: the traceback is kept
    assert REPORT_BUG in r.stderr


def test_atomic_eval_outputs_leave_no_temporary_file(tmp_path: Path, run_dir: Path) -> None:
    out = tmp_path / "res"
    files = ["--output", out / "r.json", "--plot", out / "p.png", "--save-embeddings", out / "e.safetensors"]
    argv = ["eval", "--checkpoint", str(run_dir), "--dataset", "fake", "--limit", "40", *map(str, files)]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["e.safetensors", "p.png", "r.json"]
    assert json.loads((out / "r.json").read_text())["metrics"]


def test_a_run_in_the_layout_before_generations_still_resumes(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ref = train(TrainConfig(**TINY), tmp_path / "ref", **QUIET)
    run = tmp_path / "old"
    train(TrainConfig(**TINY), run, stop_after_steps=1, **QUIET)
    # Rewrite the state as headreg.resume/1 wrote it: resume.json (no generation) beside resume.safetensors.
    meta = json.loads((run / "resume.json").read_text())
    (gen,) = [p for p in run.iterdir() if p.name.startswith("resume-")]
    save_file(load_file(gen), run / "resume.safetensors", metadata={"format": "headreg.resume/1",
                                                                    "global_step": meta["global_step"]})  # fmt: skip
    gen.unlink()
    del meta["generation"]
    meta["format"] = "headreg.resume/1"
    (run / "resume.json").write_text(json.dumps(meta))
    done = resume(run, **QUIET)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, done.model.state_dict()[k]), k
    assert not (run / "resume.safetensors").exists()  # the first save moved it to the generation layout
    assert json.loads((run / "resume.json").read_text())["format"] == "headreg.resume/2"


def test_a_flipped_byte_in_the_resumable_state_is_a_checksum_mismatch(tmp_path: Path) -> None:
    from headreg.errors import CheckpointError

    run = tmp_path / "run"
    train(TrainConfig(**TINY), run, stop_after_steps=1, **QUIET)
    (gen,) = [p for p in run.iterdir() if p.name.startswith("resume-")]
    data = bytearray(gen.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes, past the header
    gen.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        resume(run, **QUIET)
    # The escape hatch the message names: the CLI's --no-verify resumes all the same.
    r = CliRunner().invoke(main, ["train", "--resume", str(run), "--no-verify", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_no_verify_belongs_to_resume(tmp_path: Path) -> None:
    argv = ["train", "--model", "lenetpp", "--head", "softmax", "--dataset", "fake", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, [*argv, "--no-verify"])
    assert r.exit_code == 1 and "--no-verify goes with --resume" in r.output
    assert not (tmp_path / "r").exists()


def test_a_run_record_without_a_required_key_is_a_clean_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(**TINY), run, stop_after_steps=1, **QUIET)
    record = json.loads((run / "run.json").read_text())
    del record["config"]["model"]
    (run / "run.json").write_text(json.dumps(record))
    r = CliRunner().invoke(main, ["train", "--resume", str(run)])
    assert r.exit_code == 1 and "config.model" in r.output and "run.json" in r.output, r.output
    # The config class says so itself too, for a record that reaches it by another path.
    with pytest.raises(InvalidValueError, match=r"lacks the required keys \['model'\]"):
        TrainConfig.from_dict({k: v for k, v in record["config"].items()})


def test_resume_of_a_run_that_never_wrote_its_record_says_how_to_start_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "headreg.lock").write_text("")
    (run / "run.json.tmp").write_text("{")  # killed while writing the record
    r = CliRunner().invoke(main, ["train", "--resume", str(run)])
    assert r.exit_code == 1 and "stopped before it wrote anything" in r.output and f"--out {run}" in r.output
