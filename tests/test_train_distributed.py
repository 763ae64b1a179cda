"""`torchrun -m headreg train` with 2 gloo processes on CPU matches one process on the same global batch.

Exact by design: LeNet++ without batch norm (no per-rank statistics), no dropout, no augmentation, SGD,
and a global batch of 32 split 16 + 16 over a shuffle in which rank r takes positions r, r + 2, ...: the
two ranks' step-k batches together are the single process's step-k batch. The centre-loss head also
checks that its centre update is all-reduced. Only float summation order differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _dist import free_port
from safetensors.torch import load_file

ARGS = ["--model", "lenetpp", "--model-option", "widths=[4,8,8]", "--head", "center", "--dataset", "fake",
        "--embedding-dim", "2", "--epochs", "1", "--batch-size", "32", "--limit", "128", "--test-limit", "100",
        "--optimizer", "sgd", "--lr", "0.05", "--no-augment", "--device", "cpu", "--no-progress"]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "headreg", "train", *ARGS, "--out", str(ddp_dir)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "headreg", "train", *ARGS, "--out", str(single_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = json.loads((ddp_dir / "run.json").read_text())
    assert run["world_size"] == 2 and run["global_step"] == 4
    assert run["replica_max_abs_diff"] == 0.0  # every weight and buffer identical across the two ranks
    assert json.loads((single_dir / "run.json").read_text())["global_step"] == 4

    ddp, single = load_file(str(ddp_dir / "model.safetensors")), load_file(str(single_dir / "model.safetensors"))
    assert ddp.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # The centre buffer moved identically (its update is all-reduced over the ranks).
    assert single["head.centers"].abs().sum() > 0
    lines = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    single_lines = [json.loads(x) for x in (single_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == pytest.approx(single_lines[0]["loss"], rel=1e-4)
    assert lines[0]["test_accuracy"] == pytest.approx(single_lines[0]["test_accuracy"], abs=0.011)
