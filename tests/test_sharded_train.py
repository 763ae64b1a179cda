"""`headreg train --shard-head` under torchrun (gloo, CPU) equals the unsharded head in one process.

Exact by design, as tests/test_train_distributed.py: LeNet++ without batch norm, no augmentation, and a
global batch of 12 split over W ranks in which rank r takes shuffle positions r, r + W, ...: the ranks'
step-k batches together are the single process's step-k batch. ArcFace over C = 10 classes, so W = 3 holds
4 + 3 + 3 rows. The saved model (one file per rank and an index, read whole by ``headreg.load_model``) must
equal the single process's ``model.safetensors`` tensor by tensor, to 1e-5
relative in float32 (‖a − b‖ / ‖b‖ per tensor), after 6 SGD steps and after 6 AdamW steps; and a sharded run
stopped and resumed on 2, then 3, then 1 process (optimiser state resharded each time) ends where the
uninterrupted run does, each save one file per rank holding that rank's rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _dist import free_port

ARGS = ["--model", "lenetpp", "--model-option", "widths=[4,8,8]", "--head", "arcface", "--head-option", "scale=16",
        "--dataset", "fake", "--embedding-dim", "4", "--epochs", "1", "--batch-size", "12", "--limit", "72",
        "--test-limit", "30", "--no-augment", "--device", "cpu", "--no-progress", "--seed", "3"]  # fmt: skip
# SGD also clips (the total norm sums the head's rows over the ranks, so every rank clips alike; 0.05 is
# below the first steps' norms); the resume test runs it too.
OPTIMIZERS = {
    "sgd": ["--optimizer", "sgd", "--lr", "0.05", "--clip-grad-norm", "0.05"],
    "adamw": ["--optimizer", "adamw", "--lr", "0.003"],
}


def _train(args: list[str], nproc: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "headreg"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                  f"--master_port={free_port()}", "--master_addr=127.0.0.1", "-m", "headreg"]  # fmt: skip
    proc = subprocess.run([*launch, "train", *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(run) -> dict[str, torch.Tensor]:
    """A run's saved weights under the unsharded names: one file, or a sharded run's files read whole."""
    import headreg

    return headreg.load_model(run).state_dict()


def _assert_same_weights(a_dir, b_dir) -> None:
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    assert a["head.weight"].shape == (10, 4)  # the logical head, whatever the world size
    for k in a:
        # Relative error of the tensor, ‖a − b‖ / ‖b‖: float32 sums in another order differ by a few ulps.
        err = float(torch.linalg.vector_norm(a[k] - b[k]) / torch.linalg.vector_norm(b[k]).clamp_min(1e-30))
        assert err <= 1e-5, f"{k}: relative error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_sharded_head_matches_one_process(tmp_path, optimizer):
    opt = OPTIMIZERS[optimizer]
    single = tmp_path / "single"
    _train([*ARGS, *opt, "--out", str(single)], 1)
    for world in (2, 3):
        out = tmp_path / f"w{world}"
        _train([*ARGS, *opt, "--shard-head", "--out", str(out)], world)
        run = json.loads((out / "run.json").read_text())
        assert run["world_size"] == world and run["global_step"] == 6
        assert run["config"]["shard_head"] is True
        assert run["replica_max_abs_diff"] == 0.0  # backbone replicas in step; the head is not replicated
        _assert_same_weights(out, single)
        # The checkpoint is an ordinary one: headreg.load_model rebuilds the whole model in one process.
        import headreg

        model = headreg.load_model(out)
        assert type(model.head).__name__ == "ArcFaceHead" and model.head.weight.shape == (10, 4)
        # The per-epoch test accuracy was ranked from the shards exactly as one process ranks it.
        got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        want = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
        assert got[0]["test_accuracy"] == want[0]["test_accuracy"]
        assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)


@pytest.mark.slow
def test_sharded_resume_on_other_world_sizes(tmp_path):
    """Stopped after 2 steps on 2 ranks, resumed to step 4 on 3 ranks, then to the end on one process."""
    opt = OPTIMIZERS["sgd"]
    single, run = tmp_path / "single", tmp_path / "run"
    _train([*ARGS, *opt, "--out", str(single)], 1)
    _train([*ARGS, *opt, "--shard-head", "--out", str(run), "--max-steps", "2"], 2)
    state = json.loads((run / "resume.json").read_text())
    assert state["global_step"] == "2"
    _assert_rank_files(run, 2)
    _train(["--resume", str(run), "--max-steps", "4"], 3)
    _assert_rank_files(run, 3)
    _train(["--resume", str(run)], 1)
    _assert_rank_files(run, 1)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 6 and record["world_size"] == 1
    _assert_same_weights(run, single)


def _assert_rank_files(run, world: int) -> None:
    """The run's model and resumable state are one file per rank, each holding that rank's rows only."""
    from headreg.heads._sharded import shard_bounds

    state = json.loads((run / "resume.json").read_text())["shards"]
    index = json.loads((run / "model.safetensors.index.json").read_text())
    for stem, shards in (("resume", state), ("model", index)):
        gen = shards["metadata"]["generation"]
        files = [f"{stem}-{gen}-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)]
        assert sorted(shards["metadata"]["sha256"]) == files
        assert sorted(p.name for p in run.glob(f"{stem}-*.safetensors")) == files  # the older generations gone
        for key, parts in shards["row_shards"].items():  # the head's weight; SGD's momentum of it
            assert parts == [[files[r], *shard_bounds(10, world, r)] for r in range(world)], key
        assert any("momentum_buffer" in k for k in shards["row_shards"]) == (stem == "resume")
    assert not (run / "model.safetensors").exists()


@pytest.mark.slow
def test_sampled_run_is_reproducible(tmp_path):
    """--sample-rate 0.5 with AdamW on 2 ranks: it trains, the checkpoint loads, and a rerun gives the same weights."""
    args = [*ARGS, *OPTIMIZERS["adamw"], "--shard-head", "--sample-rate", "0.5"]
    a, b = tmp_path / "a", tmp_path / "b"
    _train([*args, "--out", str(a)], 2)
    _train([*args, "--out", str(b)], 2)
    run = json.loads((a / "run.json").read_text())
    assert run["config"]["sample_rate"] == 0.5 and run["global_step"] == 6
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # seeded: the same negatives, the same steps
    single = tmp_path / "single"
    _train([*ARGS, *OPTIMIZERS["adamw"], "--out", str(single)], 1)
    ws = _weights(single)
    assert not torch.equal(wa["head.weight"], ws["head.weight"])  # sampling changed the steps
    import headreg

    assert headreg.load_model(a).head.weight.shape == (10, 4)


@pytest.mark.slow
def test_learned_scale_matches_one_process(tmp_path):
    """NormFace with a learned s: each rank's classes add to its gradient (summed over the ranks), W = 2 == 1."""
    args = [a for a in ARGS if a not in ("arcface", "scale=16")]
    args[args.index("--head") + 1 : args.index("--head") + 1] = ["normface"]
    args[args.index("--head-option") + 1 : args.index("--head-option") + 1] = ["learn_scale=true"]
    single, out = tmp_path / "single", tmp_path / "w2"
    _train([*args, *OPTIMIZERS["sgd"], "--out", str(single)], 1)
    _train([*args, *OPTIMIZERS["sgd"], "--shard-head", "--out", str(out)], 2)
    a = _weights(out)
    assert "head.log_scale" in a and float(a["head.log_scale"]) != pytest.approx(float(torch.tensor(16.0).log()))
    _assert_same_weights(out, single)
    # Its optimiser state (a 0-d momentum) is replicated, not split: a resume on 3 processes ends alike.
    run = tmp_path / "run"
    _train([*args, *OPTIMIZERS["sgd"], "--shard-head", "--out", str(run), "--max-steps", "3"], 2)
    _train(["--resume", str(run)], 3)
    _assert_same_weights(run, single)


@pytest.mark.slow
def test_keep_best_saves_the_logical_head(tmp_path):
    """--val/--keep-best on 2 ranks: every rank writes its rows to best/, which loads as the whole model."""
    out = tmp_path / "run"
    val = ["--val", "fake@test", "--val-every", "2steps", "--keep-best", "fake@test/precision_at_1"]
    _train([*ARGS, *OPTIMIZERS["sgd"], "--shard-head", *val, "--out", str(out)], 2)
    import headreg

    best = headreg.load_model(out / "best")
    assert type(best.head).__name__ == "ArcFaceHead" and best.head.weight.shape == (10, 4)
    assert _weights(out / "best").keys() == _weights(out).keys()
    best_index = json.loads((out / "best" / "model.safetensors.index.json").read_text())
    assert len(best_index["metadata"]["sha256"]) == 2  # one file per rank
