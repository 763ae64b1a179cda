"""``--val`` under ``torchrun`` with 2 gloo processes: each rank extracts its shard (``headreg eval``'s path), rank 0
computes, every rank takes the same decisions, and one process's ``headreg eval`` of ``best/`` finds the same
numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _dist import free_port
from test_train_distributed import ARGS, _env
from test_train_validation import val_lines, write_small_bin

VAL = ["--val", "fake@test,lfw.bin", "--val-every", "2steps", "--keep-best", "fake@test/precision_at_1"]


@pytest.mark.slow
def test_two_gloo_processes_validate_as_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_small_bin(data / "lfw.bin")
    ddp_dir = tmp_path / "ddp"
    args = [*ARGS, *VAL, "--data-dir", str(data)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "headreg", "train", *args, "--out", str(ddp_dir)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("validation at epoch 1, step 2") == 1  # rank 0 speaks for both
    # One process evaluating the kept model with `headreg eval` finds what the two shards found together.
    ddp = val_lines(ddp_dir)
    assert [r["step"] for r in ddp] == [2, 4]
    best = next(r for r in ddp if r["step"] == ddp[-1]["best"]["step"])
    assert best["val"]["fake@test"]["num_samples"] == 1000  # every sample, gathered from the two shards
    for dataset, key in (("fake", "fake@test"), (f"bin:{data / 'lfw.bin'}", "lfw")):
        cmd = [sys.executable, "-m", "headreg", "eval", "--checkpoint", str(ddp_dir / "best"), "--dataset", dataset,
               "--json", "--no-progress", *(["--metrics", "retrieval,clustering"] if key != "lfw" else [])]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = json.loads(proc.stdout)["metrics"]
        assert expected.keys() == best["val"][key].keys()
        for metric, value in expected.items():
            assert best["val"][key][metric] == pytest.approx(value, abs=2e-3), (key, metric)
    assert json.loads((ddp_dir / "run.json").read_text())["world_size"] == 2
