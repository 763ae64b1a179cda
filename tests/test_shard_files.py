"""A class-sharded model saved one file per rank with an index, and read back on any number of processes.

``headreg.save_model`` of a sharded head on W gloo processes (W = 2, 3): each rank writes its own rows and no
more, rank 0 the replicated weights and the index (Hugging Face's ``model.safetensors.index.json`` with a
``row_shards`` entry for the tensors split by class rows). Then, in one process: ``load_model`` rebuilds the
whole model equal to the unsharded one; every block of another world size reads back exactly its rows; a
flipped byte, a missing file, a crafted file name and a commit that fails are clear errors that lose nothing.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from _dist import launch_workers
from safetensors import safe_open

import headreg
from headreg.errors import CheckpointError
from headreg.heads._sharded import shard_bounds
from headreg.models._shards import INDEX_NAME, ShardSet
from headreg.models._shards_read import read_shards

C, D = 7, 4
#: Center loss splits three tensors by class (weight, bias, centres); a learned scale is replicated.
HEADS = {
    "arcface": ({}, {"head.weight"}),
    "center": ({}, {"head.weight", "head.bias", "head.centers"}),
    "normface": ({"learn_scale": True}, {"head.weight"}),
}

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    import headreg

    out, head, options = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head, num_classes=7, embedding_dim=4, shard_head=True,
                                 head_options=options, widths=[4, 8, 8])
    for epoch in (1, 2):  # a second save replaces the first generation
        with torch.no_grad():
            model.head.inner.weight.add_(1.0)
        headreg.save_model(model, out / "ckpt", metadata={"epoch": epoch})
    rows = model.head.inner.weight.detach()
    (out / f"rank{rank}.json").write_text(json.dumps({"rows": rows.tolist(), "lo": model.head.lo, "hi": model.head.hi}))
    dist.barrier()
    from headreg.engine.runtime import cleanup_distributed
    cleanup_distributed()  # gc first: gloo's threads can abort an exiting process otherwise
    """
)


def _unsharded(head: str, options: dict) -> headreg.models.HeadModel:
    torch.manual_seed(0)  # a sharded head of this size draws exactly the unsharded head's rows
    return headreg.create_model("lenetpp", head, num_classes=C, embedding_dim=D, head_options=options, widths=[4, 8, 8])


def _index(ckpt) -> ShardSet:
    return ShardSet.from_json(json.loads((ckpt / INDEX_NAME).read_text()), "index")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_each_rank_writes_its_rows_and_one_process_loads_the_whole(tmp_path, world, head):
    options, split = HEADS[head]
    ranks = launch_workers(WORKER, tmp_path, world, head, json.dumps(options))
    ckpt = tmp_path / "ckpt"
    index = json.loads((ckpt / INDEX_NAME).read_text())
    shards = _index(ckpt)
    # Only the second generation's files remain: one per rank, Hugging Face's index beside them.
    names = sorted(p.name for p in ckpt.iterdir())
    files = [f"model-2-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)]
    assert names == sorted(["config.json", INDEX_NAME, *files])
    assert sorted(index["metadata"]["sha256"]) == files
    assert set(index["weight_map"].values()) == {files[0]}  # replicated tensors: rank 0's file
    assert set(index["row_shards"]) == split and ("head.log_scale" in index["weight_map"]) == (head == "normface")
    for key in split:
        assert index["row_shards"][key] == [[files[r], *shard_bounds(C, world, r)] for r in range(world)]
    # Rank r's file holds its rows and nothing else (rank 0's: the rest of the model too).
    for r, rank in enumerate(ranks):
        with safe_open(str(ckpt / files[r]), framework="pt") as f:
            keys, rows = set(f.keys()), f.get_tensor("head.weight")
        assert torch.equal(rows, torch.tensor(rank["rows"])) and rows.shape == (rank["hi"] - rank["lo"], D)
        assert keys == (split if r else set(index["weight_map"]) | split)
    # One process rebuilds the whole model: the unsharded model's weights, the head moved by the two saves' +1.
    model = headreg.load_model(ckpt)
    want = _unsharded(head, options).state_dict()
    want["head.weight"] += 1.0  # twice, as the workers did (float32: not the same as adding 2)
    want["head.weight"] += 1.0
    got = model.state_dict()
    assert got.keys() == want.keys() and [n for n in want if not torch.equal(got[n], want[n])] == [], head
    assert model.config["metadata"] == {"epoch": 2} and type(model.head).__name__ != "ShardedHead"
    # Any other world size reads back exactly its block's rows, from whichever files hold them.
    for other in (1, 2, 3, 4):
        blocks = [read_shards(ckpt, shards, classes=shard_bounds(C, other, r), where="t") for r in range(other)]
        for key in split:
            sizes = [hi - lo for lo, hi in (shard_bounds(C, other, r) for r in range(other))]
            assert [b[key].shape[0] for b in blocks] == sizes
            assert torch.equal(torch.cat([b[key] for b in blocks]), want[key])


def _one_process_checkpoint(tmp_path):
    """A sharded model in one process (a world of one: one file), saved twice."""
    torch.manual_seed(0)
    model = headreg.create_model(
        "lenetpp", "arcface", num_classes=C, embedding_dim=D, shard_head=True, widths=[4, 8, 8]
    )
    ckpt = tmp_path / "ckpt"
    headreg.save_model(model, ckpt)
    headreg.save_model(model, ckpt)
    return model, ckpt


def test_a_world_of_one_writes_the_index_too(tmp_path):
    model, ckpt = _one_process_checkpoint(tmp_path)
    assert (ckpt / "model-2-00001-of-00001.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    loaded = headreg.load_model(ckpt / INDEX_NAME)  # the index's path works as the directory's
    assert torch.equal(loaded.head.weight, model.head.inner.weight)
    assert headreg.models.read_config(ckpt)["head"] == "arcface"
    other = _unsharded("arcface", {})
    headreg.models.load_weights(other, ckpt)
    assert torch.equal(other.head.weight, model.head.inner.weight)
    with pytest.raises(CheckpointError, match="directory"):
        headreg.save_model(model, tmp_path / "one.safetensors")


def test_a_flipped_byte_in_a_shard_is_a_checksum_mismatch(tmp_path):
    _, ckpt = _one_process_checkpoint(tmp_path)
    path = ckpt / "model-2-00001-of-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model-2-00001-of-00001.safetensors: checksum mismatch"):
        headreg.load_model(ckpt)
    headreg.load_model(ckpt, verify=False)  # --no-verify loads it anyway


def test_a_crafted_or_incomplete_index_is_refused(tmp_path):
    _, ckpt = _one_process_checkpoint(tmp_path)
    index = json.loads((ckpt / INDEX_NAME).read_text())

    def refused(edit, match):
        bad = json.loads(json.dumps(index))
        edit(bad)
        (ckpt / INDEX_NAME).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=match):
            headreg.load_model(ckpt)

    name = "model-2-00001-of-00001.safetensors"
    refused(lambda i: i["metadata"]["sha256"].update({"../../secret.safetensors": "0" * 64}), "not a shard file name")
    refused(lambda i: i["weight_map"].update({"neck.0.weight": "model-2-00009-of-00009.safetensors"}), "does not list")
    refused(lambda i: i["row_shards"]["head.weight"][0].__setitem__(1, 1), "does not cover its rows")
    refused(lambda i: i["metadata"].update({"generation": 3}), "not of generation 3")
    refused(lambda i: i.pop("weight_map"), "required key 'weight_map'")
    refused(lambda i: i["weight_map"].pop(next(iter(i["weight_map"]))), "does not fit this model: missing")
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}, which the index names, is missing"):
        headreg.load_model(ckpt)


def test_a_failed_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The index is the commit: when writing it fails, the previous generation's index and files still load."""
    model, ckpt = _one_process_checkpoint(tmp_path)
    from headreg.models import checkpoint

    real = checkpoint.atomic_write_text

    def failing(path, text):
        if path.name == INDEX_NAME:
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", failing)
    saved = model.head.inner.weight.detach().clone()
    with torch.no_grad():
        model.head.inner.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="could not commit the model shards.*No space left"):
        headreg.save_model(model, ckpt)
    assert _index(ckpt).generation == 2
    loaded = headreg.load_model(ckpt)
    assert torch.equal(loaded.head.weight, saved)


def _rundir_state(tmp_path):
    """A resumable state with a per-row head weight and momentum, saved by a world of one as per-rank files."""
    from headreg.engine._checkpoint import state_key
    from headreg.engine._rundir import RunDir
    from headreg.models._shards import RowSplit

    weight, momentum = torch.arange(C * D, dtype=torch.float32).reshape(C, D), torch.randn(C, D)
    state = {
        "model": {"head.weight": weight, "neck.bias": torch.ones(3)},
        "optimizer": {"state": {0: {"momentum_buffer": momentum}}, "param_groups": [{"params": [0], "lr": 0.1}]},
        "progress": {"epoch": 0, "global_step": 3, "steps_per_epoch": 6, "world_size": 1, "tally": None},
    }
    keys = [state_key("model", "head.weight"), state_key("optimizer", "state", 0, "momentum_buffer")]
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.save_state(state, RowSplit({k: (0, C) for k in keys}, C))
    return run, weight, momentum


def test_resumable_state_reads_each_block_of_any_world_size(tmp_path):
    run, weight, momentum = _rundir_state(tmp_path)
    assert json.loads((run.path / "resume.json").read_text())["shards"]["metadata"]["generation"] == 1
    for world in (1, 2, 3):
        for rank in range(world):
            lo, hi = shard_bounds(C, world, rank)
            state = run.load_state(rank=rank, world_size=world)
            assert torch.equal(state["model"]["head.weight"], weight[lo:hi])
            assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"], momentum[lo:hi])
            assert torch.equal(state["model"]["neck.bias"], torch.ones(3)) and state["progress"]["global_step"] == 3


def test_a_torn_sharded_resumable_state_is_a_clear_error(tmp_path):
    run, _, _ = _rundir_state(tmp_path)
    path = run.path / "resume-1-00001-of-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"--resume .*unreadable.*resume-1-00001-of-00001.*checksum mismatch"):
        run.load_state()
    run.load_state(verify=False)
    path.unlink()
    with pytest.raises(CheckpointError, match="resume-1-00001-of-00001.safetensors, which the index names, is missing"):
        run.load_state()
    meta = json.loads((run.path / "resume.json").read_text())
    meta["shards"]["row_shards"]["s.model.head.weight"][0][0] = "../../elsewhere.safetensors"
    (run.path / "resume.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not list"):
        run.load_state()
    with pytest.raises(CheckpointError, match="7 classes cannot be split over 8 processes"):
        meta["shards"]["row_shards"]["s.model.head.weight"][0][0] = "resume-1-00001-of-00001.safetensors"
        (run.path / "resume.json").write_text(json.dumps(meta))
        run.load_state(rank=0, world_size=8)


def test_a_files_digest_streamed_from_disk_is_its_tensors_digest(tmp_path):
    """file_sha256 reads the file's bytes a chunk at a time and gives tensors_sha256 of what it holds."""
    from safetensors.torch import load_file, save_file

    from headreg.models._digest import file_sha256, tensors_sha256

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(33, 5, generator=g),
        "h": torch.randn(7, generator=g).to(torch.bfloat16),
        "step": torch.tensor(3.0),
        "mask": torch.rand(9, generator=g) > 0.5,
        "ids": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "x"})
    assert file_sha256(path, chunk=7) == tensors_sha256(load_file(str(path))) == tensors_sha256(tensors)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*cut short"):
        file_sha256(path)


FAILING_WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    import headreg
    from headreg.errors import CheckpointError
    from headreg.models import _shards

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", "arcface", num_classes=7, embedding_dim=4, shard_head=True,
                                 widths=[4, 8, 8])
    headreg.save_model(model, out / "ckpt")
    if rank == 1:  # this rank's disk is full from now on
        def full(path):
            raise OSError(28, "No space left on device")
        _shards.atomic_output = full
    with torch.no_grad():
        model.head.inner.weight.add_(1.0)
    try:
        headreg.save_model(model, out / "ckpt")
        error = None
    except CheckpointError as exc:
        error = str(exc)
    (out / f"rank{rank}.json").write_text(json.dumps({"error": error}))
    from headreg.engine.runtime import cleanup_distributed
    cleanup_distributed()  # gc first: gloo's threads can abort an exiting process otherwise
    """
)


def test_a_rank_that_cannot_write_is_an_error_on_every_rank(tmp_path):
    """No rank waits forever for another's file: all of them raise, and the checkpoint before still loads."""
    ranks = launch_workers(FAILING_WORKER, tmp_path, 3, timeout=120)
    for rank in ranks:
        assert rank["error"] and "rank 1: OSError" in rank["error"] and "No space left" in rank["error"]
    assert _index(tmp_path / "ckpt").generation == 1
    loaded = headreg.load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.head.weight, _unsharded("arcface", {}).head.weight)
