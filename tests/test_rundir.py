"""The run directory unit: atomic JSON, metrics.jsonl, resumable state, and the --out guard train and compare share."""

from __future__ import annotations

import json

import pytest
import torch

from headreg.engine._rundir import RUN_FILES, OutLayout, RunDir, claim_out_dir, write_json
from headreg.errors import CheckpointError, InvalidValueError


def test_write_json_is_atomic_and_byte_stable(tmp_path):
    path = tmp_path / "x.json"
    obj = {"b": [1, 2.5], "a": {"z": None, "y": "s"}, "p": tmp_path, "t": torch.tensor(3)}
    write_json(path, obj)
    # The exact bytes earlier headreg versions wrote: indented, key-sorted, one trailing newline.
    expected = {"b": [1, 2.5], "a": {"z": None, "y": "s"}, "p": str(tmp_path), "t": 3}
    assert path.read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_json(tmp_path / "y.json", {"bad": object()})
    assert path.read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"  # the old file is intact


def test_run_record_and_metrics_lines(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError, match="holds no run.json"):
        run.read_record()
    run.write_record({"status": "running", "config": {"head": "arcface"}})
    assert run.read_record() == {"format": "headreg.run/1", "status": "running", "config": {"head": "arcface"}}
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        run.read_record()

    assert run.read_metrics() == []
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "loss": 1.0 / epoch})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[0] == '{"epoch": 1, "loss": 1.0}'
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "lo')  # a line torn by a crash
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    run.rewrite_metrics(run.read_metrics()[:2])
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_resumable_state_round_trip_and_refusals(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError, match="no resumable state"):
        run.load_state()
    state = {
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": [(1, 2), None],
        "progress": {"epoch": 1, "global_step": 7},
    }
    run.save_state(state)
    back = run.load_state()
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["optimizer"]["state"][0]["step"] == 3.0 and back["rng"] == [(1, 2), None]
    assert back["progress"] == {"epoch": 1, "global_step": 7}
    meta = json.loads((tmp_path / "resume.json").read_text())
    meta["global_step"] = "8"  # as if the run stopped between the two files
    (tmp_path / "resume.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="disagree"):
        run.load_state()
    (tmp_path / "resume.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        run.load_state()


def test_resumable_state_saves_tensors_that_share_storage(tmp_path):
    """The state's tensors are written as they are, not copied; those sharing storage (tied weights, a view) too."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    w = torch.arange(12.0).reshape(3, 4)
    state = {"model": {"a": w, "tied": w, "row": w[1]}, "progress": {"epoch": 0, "global_step": 1}}
    run.save_state(state)
    back = run.load_state()["model"]
    assert torch.equal(back["a"], w) and torch.equal(back["tied"], w) and torch.equal(back["row"], w[1])
    assert torch.equal(w, torch.arange(12.0).reshape(3, 4))  # the live tensors untouched


def test_claim_refuses_foreign_and_occupied_directories(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim({"head": "softmax"}, overwrite=False)
    assert run.path.is_dir()
    run.claim({"head": "softmax"}, overwrite=False)  # still empty: fine
    run.write_record({"status": "stopped", "config": {"head": "softmax"}})
    with pytest.raises(InvalidValueError, match=r"already holds this run \(status stopped\); `headreg train --resume"):
        run.claim({"head": "softmax"}, overwrite=False)
    with pytest.raises(InvalidValueError, match="already holds a different run.*head: 'softmax' there, 'arcface' now"):
        run.claim({"head": "arcface"}, overwrite=False)
    (run.path / "metrics.jsonl.tmp").write_text("")
    run.claim({"head": "arcface"}, overwrite=True)
    assert list(run.path.iterdir()) == []
    (run.path / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidValueError, match=r"holds files that are not a headreg run \(notes.txt\)"):
        run.claim({"head": "arcface"}, overwrite=True)
    assert (run.path / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidValueError, match="must be a directory"):
        RunDir(tmp_path / "file").claim({}, overwrite=True)
    assert set(RUN_FILES) >= {"run.json", "model.safetensors", "metrics.jsonl", "resume.json", "resume.safetensors"}


def test_overwrite_removes_a_sharded_runs_files_and_nothing_like_them(tmp_path):
    """A class-sharded run's per-rank files and index are the run's (--overwrite removes them); a look-alike is not."""
    run = RunDir(tmp_path / "run")
    run.claim({"head": "arcface"}, overwrite=False)
    ours = [
        "model.safetensors.index.json",
        "model-3-00001-of-00002.safetensors",
        "model-3-00002-of-00002.safetensors",
        "resume-4-00002-of-00002.safetensors",
        "resume-4-00001-of-00002.tmp.safetensors",  # what a killed write leaves
        "resume.json",
    ]
    for name in ours:
        (run.path / name).write_text("")
    run.write_record({"status": "stopped", "config": {"head": "arcface"}})
    run.claim({"head": "arcface"}, overwrite=True)
    assert list(run.path.iterdir()) == []
    for name in (
        "model-3-00001-of-00002.safetensors.bak",
        "model-0-00001-of-00002.safetensors",
        "model-1-1-of-2.safetensors",
    ):
        (run.path / name).write_text("")
        with pytest.raises(InvalidValueError, match="not a headreg run"):
            run.claim({"head": "arcface"}, overwrite=True)
        (run.path / name).unlink()


def test_compare_layout_keeps_head_runs_and_ignores_empty_ones(tmp_path):
    layout = OutLayout("comparison", frozenset({"compare.png", "compare.json"}), run_subdirs=True)

    def occupied(present):
        return "occupied: " + ",".join(p.name for p in present)

    out = tmp_path / "cmp"
    (out / "failed_head").mkdir(parents=True)  # a head whose run failed before writing
    claim_out_dir(out, layout, overwrite=False, occupied=occupied)
    (out / "softmax").mkdir()
    (out / "softmax" / "run.json").write_text("{}")
    (out / "compare.png").write_bytes(b"png")
    with pytest.raises(InvalidValueError, match="occupied: compare.png,softmax"):
        claim_out_dir(out, layout, overwrite=False, occupied=occupied)
    claim_out_dir(out, layout, overwrite=True, occupied=occupied)
    assert sorted(p.name for p in out.iterdir()) == ["failed_head", "softmax"]  # the head run is its own guard's
    (out / "stray").mkdir()
    (out / "stray" / "x").write_text("")
    with pytest.raises(InvalidValueError, match="not a headreg comparison \\(stray\\)"):
        claim_out_dir(out, layout, overwrite=True, occupied=occupied)
