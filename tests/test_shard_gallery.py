"""Gallery-sharded exact k-NN (`--shard-gallery`): the merge, and W = 2 and 3 gloo processes against one process.

The embeddings are crafted with exact ties: entries ±1/4 in 16 dimensions are unit vectors whose dot products
are multiples of 1/16, exact in float32 whatever the order of the sums, and rows repeat across the ranks'
shards with different labels. Which of two tied items ranks first then moves P@1, R-precision and MAP@R, so
the metrics are equal to one process's only if the merge applies the tie rule exactly (a control below checks
that the other tie order gives different numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _dist import free_port, launch_workers

from headreg.metrics._knn import GallerySearch, iter_ranked_neighbours
from headreg.metrics._knn_merge import merge_ranked

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def tied(n: int, seed: int, classes: int = 7, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` unit rows with entries ±1/4 (few distinct rows: many exact ties) and labels independent of them."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randint(0, 2, (max(8, n // 6), dim), generator=gen) * 2 - 1).float() / 4
    x = base[torch.randint(0, base.shape[0], (n,), generator=gen)]
    return x, torch.randint(0, classes, (n,), generator=gen)


def test_merge_reproduces_the_tie_rule_of_one_sort() -> None:
    x, _ = tied(90, 0)
    q = x[:20]
    k = torch.randint(1, 30, (20,))
    whole = next(iter_ranked_neighbours(q, x, k, chunk_size=20))[1]
    parts_idx, parts_val = [], []
    for lo, hi in ((0, 31), (31, 32), (32, 90)):  # uneven, one part with a single item
        search = GallerySearch(x[lo:hi], chunk_size=20, tile_size=16)
        nbr, sim = search.search(q, k)
        assert torch.equal(sim[nbr >= 0], (q @ x[lo:hi].T).gather(1, nbr.clamp(min=0))[nbr >= 0])
        parts_idx.append(torch.where(nbr >= 0, nbr + lo, nbr))
        parts_val.append(sim)
    assert torch.equal(merge_ranked(parts_idx, parts_val, k), whole)


def test_search_values_are_the_ranking_similarities_on_the_sampled_path() -> None:
    torch.manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(5000, 8), dim=1)  # >= 4096 items: sampled thresholds
    q = g[:64]
    search = GallerySearch(g, chunk_size=64, tile_size=1024)
    nbr, sim = search.search(q, torch.full((64,), 40), torch.arange(64))
    assert (nbr != torch.arange(64).unsqueeze(1)).all()
    assert (sim[:, 1:] <= sim[:, :-1]).all()  # best first
    torch.testing.assert_close(sim, (q @ g.T).gather(1, nbr), rtol=0, atol=1e-6)
    raw = torch.randn(5000, 8) * 3
    own = GallerySearch(raw, chunk_size=64, tile_size=1024, normalize=True)  # normalises its own copy in place
    assert torch.equal(own.rows(torch.arange(5000)), torch.nn.functional.normalize(raw, dim=1))
    assert not torch.equal(raw, torch.nn.functional.normalize(raw, dim=1))  # the caller's tensor is untouched


def test_metrics_do_not_depend_on_the_chunking_or_the_scan() -> None:
    from headreg.engine._shard_eval import evaluate_sharded
    from headreg.engine.extract import Extraction
    from headreg.metrics.retrieval import retrieval_metrics

    gen = torch.Generator().manual_seed(5)
    y = torch.randint(0, 40, (4500,), generator=gen)
    x = torch.randn(40, 12, generator=gen)[y] + 2 * torch.randn(4500, 12, generator=gen)
    symmetric = retrieval_metrics(x, y)  # from 4,096 items: the leave-one-out symmetric scan, blocks of 512
    assert retrieval_metrics(x, y, chunk_size=300) == symmetric
    per_query = evaluate_sharded([Extraction(x, y)], metrics=None, recall_k=(1, 2, 4, 8), device=torch.device("cpu"),
                                 world_size=1, chunk_size=700)["metrics"]  # fmt: skip
    assert {k: v for k, v in per_query.items() if k != "num_samples"} == symmetric  # bit for bit


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from test_shard_gallery import tied
    from headreg.engine.evaluate import evaluate_embeddings
    from headreg.engine.extract import Extraction
    from headreg.engine._shard_eval import evaluate_sharded
    from headreg.errors import HeadregError

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def shard(x):  # the evaluation loaders' contiguous slice of rank r
        n = x.shape[0]
        return x[rank * n // world : (rank + 1) * n // world]

    def run(q, ql, g=None, gl=None, chunk=None, ranks=None):
        parts = [Extraction(shard(q), shard(ql), None if ranks is None else shard(ranks), images=len(shard(q)))]
        if g is not None:
            parts.append(Extraction(shard(g), shard(gl)))
        out = evaluate_sharded(parts, metrics=None, recall_k=(1, 2, 4), device=torch.device("cpu"),
                               world_size=world, chunk_size=chunk)
        return out["metrics"], out["warnings"]

    def one(q, ql, g=None, gl=None, ranks=None):  # the reference: one process, on rank 0 only
        if rank:
            return None
        if g is None:
            return evaluate_embeddings(q, ql, label_rank=ranks, metrics=["retrieval"] + (["classification"] if
                                       ranks is not None else []), recall_k=(1, 2, 4))
        x, y = torch.cat([q, g]), torch.cat([ql, gl])
        m = torch.arange(len(y)) < len(ql)
        return evaluate_embeddings(x, y, is_query=m, is_gallery=~m, metrics=["retrieval"], recall_k=(1, 2, 4))

    out = {}
    x, y = tied(301, 1)
    ranks = torch.randint(0, 6, (301,), generator=torch.Generator().manual_seed(2))
    out["loo"] = [run(x, y, ranks=ranks), one(x, y, ranks=ranks)]
    out["loo_chunks"] = [run(x, y, chunk=7)[0], out["loo"][1]]
    # the tie rule reversed (gallery in reverse order): a control that the ties move the metrics
    out["reversed"] = one(x.flip(0), y.flip(0))
    q, qy = tied(97, 3)
    g, gy = tied(4200, 4)  # from 4096 gallery items one process samples its thresholds; each rank does not
    gy[:40] = 99  # query labels never reach 99: those gallery items are only negatives
    out["qg"] = [run(q, qy, g, gy), one(q, qy, g, gy)]
    bad = x.clone()
    bad[250, 3] = float("nan")
    try:
        run(bad, y)
    except HeadregError as err:
        out["nan"] = str(err)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    """
)


def _launch(tmp_path: Path, world: int) -> list[dict]:
    return launch_workers(WORKER, tmp_path, world, str(Path(__file__).parent))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_metrics_equal_one_process_ties_included(tmp_path: Path, world: int) -> None:
    ranks = _launch(tmp_path, world)
    r0 = ranks[0]
    for key in ("loo", "loo_chunks", "qg"):  # every rank returns the same result
        assert all(r[key][0] == r0[key][0] for r in ranks[1:])
    (sharded, warn), (single, single_warn) = r0["loo"]
    assert sharded == single and warn == single_warn
    assert set(sharded) >= {"precision_at_1", "mean_average_precision_at_r", "top1_accuracy", "top5_accuracy"}
    assert r0["loo_chunks"][0] == {k: v for k, v in single.items() if not k.startswith("top")}
    (qg, qg_warn), (qg_one, qg_one_warn) = r0["qg"]
    assert qg == qg_one and qg_warn == qg_one_warn
    # the control: with the other tie order one process gets other numbers, so the equalities above can fail
    assert r0["reversed"][0]["mean_average_precision_at_r"] != single["mean_average_precision_at_r"]
    assert all(r["nan"] == r0["nan"] for r in ranks)
    assert r0["nan"].startswith("embeddings must be finite, got 1 of 301 rows with NaN or Inf (first at row 250)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import headreg

    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10)
    return headreg.save_model(model, tmp_path_factory.mktemp("run") / "run").parent


def test_cli_under_torchrun_matches_one_process(ckpt: Path) -> None:
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "fake", "--limit", "150", "--batch-size", "25"]
    args += [
        "--query-split",
        "test",
        "--gallery-split",
        "train",
        "--json",
        "--device",
        "cpu",
        "--metrics",
        "retrieval,classification",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "headreg", *args], capture_output=True,
                         text=True, env=env, timeout=240)  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    two = subprocess.run([*launch, "-m", "headreg", *args, "--shard-gallery"], capture_output=True, text=True,
                         env=env, timeout=240)  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone prints
    assert b["metrics"] == a["metrics"] and b["info"]["shard_gallery"] and b["info"]["world_size"] == 2
    assert (b["info"]["num_queries"], b["info"]["num_gallery"]) == (150, 150)


def test_cli_refuses_what_needs_every_embedding(ckpt: Path, tmp_path: Path) -> None:
    from _cli import invoke

    base = ("--checkpoint", ckpt, "--dataset", "fake", "--limit", "40", "--shard-gallery")
    out = invoke(*base, "--plot", tmp_path / "p.png", ok=False).output
    assert "--shard-gallery keeps the embeddings spread over the ranks; --plot needs all of them" in out
    out = invoke(*base, "--metrics", "retrieval,verification,clustering", ok=False).output
    assert "verification, clustering need every embedding in one process" in out
    assert "faiss" not in out
    out = invoke(*base, "--knn", "faiss", ok=False).output
    assert "merges the exact torch k-NN search only" in out


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"issame": [True]}, "face-pairs dataset has no gallery"),
        ({"protocol": "ijb"}, "face-pairs dataset has no gallery"),
        ({"is_query": torch.ones(3, dtype=torch.bool)}, "roles need every embedding"),
        ({"is_gallery": torch.ones(3, dtype=torch.bool)}, "roles need every embedding"),
    ],
)
def test_datasets_whose_protocol_is_not_a_plain_search_are_refused(attrs: dict, message: str) -> None:
    from types import SimpleNamespace

    from headreg.engine._shard_eval import check_sharded_metrics
    from headreg.errors import InvalidValueError

    check_sharded_metrics(None, "torch", SimpleNamespace())  # a plain dataset passes
    check_sharded_metrics(None, "torch", SimpleNamespace(categories=["a"]))  # SOP: evaluated without its categories
    with pytest.raises(InvalidValueError, match=message):
        check_sharded_metrics(None, "torch", SimpleNamespace(**attrs))
