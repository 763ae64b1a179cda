"""Gallery-sharded exact k-NN against one process: ``python benchmarks/bench_scale.py knn [options]``.

Synthetic embeddings (``--classes`` Gaussian clusters in ``--dim`` dimensions, seeded per block of rows, so a
rank generates only its own rows and never the whole gallery) are searched by ``--queries`` queries of the same
distribution (query/gallery), or leave-one-out with ``--queries 0``. Two ways, each in fresh processes:

* ``one``: one process holds everything and runs ``headreg eval``'s metric step on it
  (``engine.evaluate.evaluate_embeddings`` on the query rows stacked on the gallery rows, as after a gather);
* ``sharded``: ``--world`` gloo processes, each holding its contiguous ``1/W`` of the queries and of the gallery,
  run ``engine._shard_eval.evaluate_sharded`` (``headreg eval --shard-gallery``).

Each process reports its wall time of the metric step, its CPU time (user + system: what a loaded machine
does not inflate), and its peak RSS (``ru_maxrss``), also less its RSS
once torch and headreg are imported and the k-NN kernels warmed up on 5,000 random rows. The runs alternate
(one, sharded, one, ...) ``--repeats`` times; the table gives medians, and whether the metrics were identical in
every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_BLOCK = 1 << 16


def _rows(lo: int, hi: int, args: argparse.Namespace, stream: int):  # noqa: ANN202 - torch imported lazily
    """Rows ``[lo, hi)`` of stream 0 (gallery) or 1 (queries): embeddings and labels, the same in every process."""
    import torch

    centres = torch.randn(args.classes, args.dim, generator=torch.Generator().manual_seed(args.seed))
    xs, ys = [], []
    for b in range(lo // _BLOCK, (hi + _BLOCK - 1) // _BLOCK):
        gen = torch.Generator().manual_seed(args.seed * 7919 + stream * 1_000_003 + b)
        y = torch.randint(0, args.classes, (_BLOCK,), generator=gen)
        x = centres[y] + args.noise * torch.randn(_BLOCK, args.dim, generator=gen)
        a, z = max(lo, b * _BLOCK) - b * _BLOCK, min(hi, (b + 1) * _BLOCK) - b * _BLOCK
        xs.append(x[a:z].clone())
        ys.append(y[a:z].clone())
        del x, y
    return torch.cat(xs), torch.cat(ys)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    """One process of one run: generate this rank's rows, time the metric step, write a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from headreg.engine._shard_eval import evaluate_sharded
    from headreg.engine.evaluate import evaluate_embeddings
    from headreg.engine.extract import Extraction

    # Warm-up: numba's compiled kernels load on first use (seconds), which is not what is measured here.
    w = torch.nn.functional.normalize(torch.randn(5000, args.dim), dim=1)
    wl = torch.arange(5000) % 10
    evaluate_embeddings(w, wl, metrics=["retrieval"])
    first = torch.arange(5000) < 500
    evaluate_embeddings(w, wl, is_query=first, is_gallery=~first, metrics=["retrieval"])
    del w, wl
    base = _current_rss_mib()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    loo = args.queries == 0
    if args.mode == "one":
        g, gl = _rows(0, args.n, args, 0)
        if loo:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            metrics, _ = evaluate_embeddings(g, gl, metrics=["retrieval"])
        else:
            q, ql = _rows(0, args.queries, args, 1)
            x, y = torch.cat([q, g]), torch.cat([ql, gl])
            del g
            mask = torch.arange(y.numel()) < args.queries
            t0, c0 = time.perf_counter(), _cpu_seconds()
            metrics, _ = evaluate_embeddings(x, y, is_query=mask, is_gallery=~mask, metrics=["retrieval"])
    else:
        torch.distributed.init_process_group("gloo")
        g, gl = _rows(rank * args.n // world, (rank + 1) * args.n // world, args, 0)
        parts = [Extraction(g, gl)]
        if not loo:
            q, ql = _rows(rank * args.queries // world, (rank + 1) * args.queries // world, args, 1)
            parts.insert(0, Extraction(q, ql))
        torch.distributed.barrier()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = evaluate_sharded(parts, metrics=["retrieval"], recall_k=(1, 2, 4, 8), device=torch.device("cpu"),
                               world_size=world)  # fmt: skip
        metrics = out["metrics"]
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if args.mode != "one":
        torch.distributed.destroy_process_group()
    record = {"mode": args.mode, "rank": rank, "seconds": seconds, "cpu_seconds": cpu, "metrics": metrics,
              "peak_rss_mib": _rss_mib(), "base_rss_mib": base}  # fmt: skip
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(mode: str, world: int, args: argparse.Namespace, out: Path) -> list[dict]:
    env_base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
    opts = [f"--{k}={getattr(args, k)}" for k in ("n", "queries", "dim", "classes", "noise", "seed", "threads")]
    port = _free_port()
    procs = []
    out.write_text("")
    for rank in range(world):
        env = {**env_base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--out", str(out), *opts]
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a {mode} worker failed (exit {p.returncode})")
    return [json.loads(line) for line in out.read_text().splitlines()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_scale.py knn", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="gallery items")
    p.add_argument("--queries", type=int, default=1000, help="queries (0: leave-one-out over the gallery)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--noise", type=float, default=2.5, help="std of the clusters (centres are N(0, 1))")
    p.add_argument("--world", type=int, default=2, help="processes of the sharded run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="one", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs: dict[str, list[list[dict]]] = {"one": [], "sharded": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode, world in (("one", 1), ("sharded", args.world)):
                records = _launch(mode, world, args, Path(tmp) / f"{mode}{r}.jsonl")
                runs[mode].append(records)
                worst = max(records, key=lambda x: x["peak_rss_mib"])
                secs = max(x["seconds"] for x in records)
                line = f"repeat {r + 1}: {mode} W={world}: {secs:.1f} s, peak RSS {worst['peak_rss_mib']:.0f} MiB"
                print(line, file=sys.stderr, flush=True)
    reference = runs["one"][0][0]["metrics"]
    identical = all(rec["metrics"] == reference for mode in runs for recs in runs[mode] for rec in recs)
    protocol = "leave-one-out" if args.queries == 0 else f"{args.queries} queries"
    print(f"N = {args.n:,}, D = {args.dim}, {args.classes} classes, {protocol}, {args.threads} thread(s) per process, "
          f"medians of {args.repeats} alternating runs")  # fmt: skip
    print()
    head = "| run | processes | wall (s) | CPU s, slowest rank | CPU s, all ranks | peak RSS per rank (MiB) | "
    print(head + "of which data and search (MiB) | × one's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    one_extra = None
    for mode, world in (("one", 1), ("sharded", args.world)):
        secs = statistics.median(max(x["seconds"] for x in recs) for recs in runs[mode])
        cpu_max = statistics.median(max(x["cpu_seconds"] for x in recs) for recs in runs[mode])
        cpu_sum = statistics.median(sum(x["cpu_seconds"] for x in recs) for recs in runs[mode])
        peak = statistics.median(max(x["peak_rss_mib"] for x in recs) for recs in runs[mode])
        extra = statistics.median(max(x["peak_rss_mib"] - x["base_rss_mib"] for x in recs) for recs in runs[mode])
        one_extra = one_extra or extra
        print(f"| {mode} | {world} | {secs:.1f} | {cpu_max:.1f} | {cpu_sum:.1f} | {peak:.0f} | {extra:.0f} | "
              f"{extra / one_extra:.2f} |")  # fmt: skip
    print()
    print(f"metrics identical in every run: {identical}")
    print(json.dumps(reference, indent=None))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
