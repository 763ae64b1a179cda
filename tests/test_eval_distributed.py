"""`torchrun --nproc_per_node=2 -m headreg eval` on gloo/CPU: same samples, same metrics as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist import free_port
from safetensors.torch import load_file

import headreg

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

# One thread per process in both runs and batches that fall on the shard boundary (200 samples, 2 ranks, batch 50):
# the backbone then sees the very same batches, so embeddings, and hence metrics, are bit-identical.
ARGS = ("--dataset", "fake", "--limit", "200", "--batch-size", "50", "--json", "--device", "cpu")
METRICS = ("--metrics", "retrieval,verification,clustering,classification")


def _run(*args: str, nproc: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "headreg", "eval", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        cmd += [f"--master_port={free_port()}", "-m", "headreg", "eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10)
    return headreg.save_model(model, tmp_path_factory.mktemp("run") / "run").parent


def test_two_processes_match_one(ckpt: Path, tmp_path: Path) -> None:
    one = _run("--checkpoint", str(ckpt), *ARGS, *METRICS, "--save-embeddings", str(tmp_path / "1.st"), nproc=1)
    two = _run("--checkpoint", str(ckpt), *ARGS, *METRICS, "--save-embeddings", str(tmp_path / "2.st"), nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 printed: one JSON document
    assert b["info"]["world_size"] == 2 and a["info"]["world_size"] == 1
    assert b["metrics"] == a["metrics"]
    e1, e2 = load_file(str(tmp_path / "1.st")), load_file(str(tmp_path / "2.st"))
    # every sample once, in dataset order: the labels line up and no row is repeated
    assert torch.equal(e1["labels"], e2["labels"]) and e2["embeddings"].shape == (200, 2)
    assert torch.equal(e1["embeddings"], e2["embeddings"])
    assert torch.unique(e2["embeddings"], dim=0).shape[0] == 200


def test_an_error_on_rank_0_stops_both_ranks_with_one_message(tmp_path: Path) -> None:
    from headreg.data import save_embeddings

    emb = torch.randn(6, 3)
    emb[4, 0] = float("inf")
    path = save_embeddings(tmp_path / "bad.st", emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    # the metrics run on rank 0 only; rank 1 must learn of the failure instead of waiting for a result
    bad = _run("--embeddings", str(path), nproc=2)
    assert bad.returncode != 0
    assert bad.stderr.count("Error: embeddings must be finite, got 1 of 6 rows") == 1, bad.stderr
    # torchrun's launcher prints its own ChildFailedError trace; no frame may come from the workers' code
    assert not [line for line in bad.stderr.splitlines() if line.strip().startswith("File") and "headreg" in line]
