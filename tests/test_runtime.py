"""headreg.engine.runtime: device resolution and the torch.distributed helpers, including a real 2-process run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from _dist import launch_workers

from headreg.engine import runtime
from headreg.engine.runtime import (
    DistInfo,
    all_gather_variable,
    barrier,
    broadcast_object,
    cleanup_distributed,
    dist_info,
    init_distributed,
    is_main_process,
    resolve_device,
    run_on_main,
)
from headreg.errors import InvalidValueError

# ---------------------------------------------------------------- devices


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setattr(runtime, "_mps_available", lambda: True)
    assert resolve_device("AUTO") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_explicit_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InvalidValueError, match=r"'cuda:5'.*2 CUDA device"):
        resolve_device("cuda:5")


def test_unavailable_or_unknown_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_mps_available", lambda: False)
    with pytest.raises(InvalidValueError, match="'cuda' requested but CUDA is not available") as info:
        resolve_device("cuda")
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidValueError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(InvalidValueError, match=r"got 'gpu0'"):
        resolve_device("gpu0")


# ---------------------------------------------------------------- single process


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist_info() == DistInfo(rank=0, world_size=1, local_rank=0, is_distributed=False)
    info, device = init_distributed("cpu")
    assert info == DistInfo() and device == torch.device("cpu")
    assert is_main_process()
    barrier()
    x = torch.arange(6).view(3, 2)
    assert all_gather_variable(x) is x
    assert broadcast_object({"a": 1}) == {"a": 1}
    cleanup_distributed()
    with pytest.raises(InvalidValueError, match="at least one dimension"):
        all_gather_variable(torch.tensor(1.0))


def test_run_on_main_in_one_process() -> None:
    assert run_on_main(lambda: 3) == 3 and run_on_main(lambda: 4, share=False) == 4

    def refuse() -> None:
        raise InvalidValueError("refused")

    with pytest.raises(InvalidValueError, match="refused"):
        run_on_main(refuse)


def test_init_distributed_reports_missing_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InvalidValueError, match=r"RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InvalidValueError, match="WORLD_SIZE must be an integer"):
        init_distributed("cpu")


# ---------------------------------------------------------------- two real processes (gloo, CPU)

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from headreg.data import TensorImageDataset, create_loader
    from headreg.engine.runtime import (
        all_gather_variable, barrier, broadcast_object, cleanup_distributed, init_distributed, is_main_process,
        run_on_main,
    )
    from headreg.errors import CheckpointError, HeadregError

    info, device = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    out = {"rank": rank, "world": world, "local_rank": info.local_rank, "is_dist": info.is_distributed,
           "device": str(device), "main": is_main_process()}

    # Unequal first dimensions: rank r holds r * 3 + 2 rows whose values say where they came from.
    rows = rank * 3 + 2
    x = torch.stack([torch.full((4,), 100.0 * rank + i) for i in range(rows)])
    out["gathered"] = all_gather_variable(x).tolist()
    out["bool"] = all_gather_variable(torch.arange(rank + 1) % 2 == 0).tolist()
    try:
        all_gather_variable(torch.zeros(2, 3 + rank))
        out["mismatch"] = "no error"
    except ValueError as err:
        out["mismatch"] = str(err)
    out["broadcast"] = broadcast_object({"from": rank, "cfg": [1, 2]} if rank == 0 else None)

    # Rank 0 acts, the others learn the outcome: the result, only success, or the error.
    out["on_main"] = run_on_main(lambda: {"ran_on": rank})
    out["on_main_quiet"] = run_on_main(lambda: rank + 10, share=False)

    def refuse():
        raise CheckpointError(f"refused on rank {rank}")

    def crash():
        raise OSError(f"disk full on rank {rank}")

    try:
        run_on_main(refuse)
    except CheckpointError as err:
        out["on_main_error"] = str(err)
    try:
        run_on_main(crash)
    except OSError as err:
        out["on_main_crash"] = f"OSError: {err}"
    except HeadregError as err:
        out["on_main_crash"] = f"HeadregError: {err}"

    # Labels are the sample indices, so the gathered labels show which samples each rank evaluated.
    n = 101
    ds = TensorImageDataset(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), num_classes=n)
    ev = create_loader(ds, batch_size=8, shuffle=False)
    out["eval_local"] = len(torch.cat([y for _, y in ev]))
    out["eval"] = all_gather_variable(torch.cat([y for _, y in ev])).tolist()
    tr = create_loader(ds, batch_size=8, shuffle=True, seed=3)
    tr.set_epoch(2)
    out["train"] = all_gather_variable(torch.cat([y for _, y in tr])).tolist()
    out["train_local"] = len(tr.sample_indices())
    barrier()
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    cleanup_distributed()
    """
)


def test_two_process_gloo(tmp_path: Path) -> None:
    world = 2
    r0, r1 = launch_workers(WORKER, tmp_path, world, timeout=120)

    assert (r0["rank"], r0["world"], r0["is_dist"], r0["main"], r0["device"]) == (0, 2, True, True, "cpu")
    assert (r1["rank"], r1["local_rank"], r1["main"]) == (1, 1, False)
    expected = [[100.0 * r + i] * 4 for r in range(world) for i in range(r * 3 + 2)]  # 2 rows then 5, in rank order
    assert r0["gathered"] == r1["gathered"] == expected
    assert r0["bool"] == r1["bool"] == [True, True, False]
    assert "equal trailing shapes" in r0["mismatch"] and "equal trailing shapes" in r1["mismatch"]
    assert r0["broadcast"] == r1["broadcast"] == {"from": 0, "cfg": [1, 2]}
    assert r0["on_main"] == r1["on_main"] == {"ran_on": 0}
    assert (r0["on_main_quiet"], r1["on_main_quiet"]) == (10, None)
    assert r0["on_main_error"] == r1["on_main_error"] == "refused on rank 0"
    assert r0["on_main_crash"] == "OSError: disk full on rank 0"
    assert r1["on_main_crash"] == "HeadregError: rank 0 failed: OSError: disk full on rank 0"

    # Evaluation shards: every sample exactly once, no padding, dataset order after the gather.
    assert r0["eval"] == r1["eval"] == list(range(101))
    assert r0["eval_local"] + r1["eval_local"] == 101
    # Training shards: equal counts (DistributedSampler padding), disjoint apart from the one padded sample.
    assert r0["train_local"] == r1["train_local"] == 51
    assert sorted(set(r0["train"])) == list(range(101)) and len(r0["train"]) == 102
    assert r0["train"][:51] != list(range(51))  # shuffled
