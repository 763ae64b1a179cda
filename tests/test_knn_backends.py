"""The k-NN back ends behind `_knn`: which one runs, that they agree exactly, and the stage timer."""

from __future__ import annotations

import pytest
import torch

from headreg.metrics import _knn, _knn_cpu, _knn_self, _knn_torch
from headreg.metrics._knn_base import STAGES, Layout, Stages


def _ties(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integer vectors: exact similarities, ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, 5), generator=gen).float()
    x = x[x.norm(dim=1) > 0]
    return x, torch.randint(0, 20, (x.shape[0],), generator=gen)


def _collect(chunks, rows: int, width: int) -> torch.Tensor:
    out = torch.full((rows, width), -1, dtype=torch.long)
    for start, nbr in chunks:
        out[start : start + nbr.shape[0], : nbr.shape[1]] = nbr
    return out


def test_back_end_choice():
    x, _ = _ties(4200, 1)
    layout = Layout(x, None, 0, stride=16)
    assert isinstance(_knn._tile_scan(layout, 512, 1024), _knn_cpu.CpuTileScan)
    # float64, or keys over 63 bits (2^20 rows x 4,200 items): the torch scan.
    assert isinstance(_knn._tile_scan(Layout(x.double(), None, 0, stride=16), 512, 1024), _knn_torch.TorchScan)
    assert isinstance(_knn._tile_scan(layout, 2**20, 1024), _knn_torch.TorchScan)


def test_torch_scan_one_key_sort_and_three_stable_sorts_agree():
    # With 2^20-row chunks the keys do not fit in 63 bits and the torch scan ranks by three
    # stable sorts; with 64-row chunks by one sort of packed keys. Same neighbours, ties included.
    x, y = _ties(4200, 2)
    k = torch.randint(1, 300, (200,), generator=torch.Generator().manual_seed(3))
    args = (x[:200], x, k, torch.arange(200))
    packed = _collect(_knn.iter_ranked_neighbours(*args, chunk_size=64, gallery_groups=y), 200, int(k.max()))
    stable = _collect(_knn.iter_ranked_neighbours(*args, chunk_size=2**20, gallery_groups=y), 200, int(k.max()))
    assert torch.equal(packed, stable)


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_stage_times_cover_every_stage(leave_one_out):
    x, y = _ties(4300, 4)
    x = torch.nn.functional.normalize(x, dim=1)
    k = torch.full((x.shape[0],), 40)
    stats: dict[str, float] = {}
    if leave_one_out:
        assert _knn.self_scan_applies(x, 256)
        list(_knn.iter_self_neighbours(x, k, chunk_size=256, groups=y, stats=stats))
    else:
        list(_knn.iter_ranked_neighbours(x[:300], x, k[:300], torch.arange(300), chunk_size=128, stats=stats))
    assert set(stats) == set(STAGES)
    assert all(v >= 0.0 for v in stats.values())
    assert stats["matmul"] > 0.0 and stats["select"] > 0.0 and stats["sort"] > 0.0


def test_stages_without_stats_time_nothing():
    stages = Stages(None)
    with stages("matmul"):
        pass
    stages.count("fallback_rows", 3)
    stages.add({"matmul": 1.0})
    assert stages.stats is None and stages.child().stats is None
    stats = {"matmul": 2.0}
    timed = Stages(stats)
    timed.count("fallback_rows", 3)
    child = timed.child()
    with child("select"):
        pass
    timed.add(child.stats)
    assert stats["matmul"] == 2.0 and stats["fallback_rows"] == 3.0 and set(stats) == set(STAGES)


def test_self_scan_is_its_own_back_end():
    x, y = _ties(4200, 5)
    layout = Layout(x, y, 0, stride=16)
    k = torch.full((x.shape[0],), 10)
    scan = _knn_self.SelfScan(layout, k, 128, _knn._settings(), Stages(None))
    seen = torch.zeros(x.shape[0], dtype=torch.long)
    for items, nbr in scan.run():
        seen[items] += 1
        assert nbr.shape == (items.numel(), 10)
    assert bool((seen == 1).all())
