"""Retrieval-metric speed against the matmul floor and pytorch-metric-learning, in one run.

For each size N, on the same synthetic clustered embeddings (D dims, C classes, every
sample a leave-one-out query against all others), times:

  floor    the N x N x D similarity matmul done the way headreg does it (query chunks x gallery
           tiles, `headreg.metrics._knn.similarity_tiles`: the fastest product found on this
           CPU), nothing else
  mm_rows  the same product as a plain chunked matmul (row chunks of a 32 MiB buffer), the way
           one would write it by hand; slower, shown for reference
  headreg  headreg.metrics.retrieval_metrics (P@1, R-precision, MAP@R), torch backend
           (thresholded exact k-NN, see headreg/metrics/_knn.py)
  pml      pytorch-metric-learning AccuracyCalculator(k="max_bin_count") with its default faiss k-NN
  faiss    faiss-cpu IndexFlatIP: add the gallery, search the top max_bin_count (+1 for the query
           itself in leave-one-out) of every query; the search alone, no metric: a peer's floor
  default  the whole default `headreg eval --embeddings FILE --json` (retrieval, verification,
           clustering), a separate process timed end to end: interpreter start, imports, loading
           the file, checks, every family. Its peak RSS is the process's whole RSS (ru_maxrss).
  families compute_metrics with the default families in-process, timed family by family
  verification  verification_metrics alone (label pairs sampled, scored, ROC), for N up to 1M

`--default-metrics` adds floor, default and families to the methods. `--class-sizes 2:12` makes
classes of 2 to 12 samples (uniform), as many as `--classes`, and N their total (the SOP shape:
`--classes 11316 --sizes 60502` gives N = 60,502). `--query-gallery Q,G` times the query/gallery
protocol instead of leave-one-out: Q query and G gallery samples drawn from the same classes (the
In-shop shape: `--query-gallery 14218,12612 --classes 3985`); N is then Q + G.

Each method runs in its own subprocess; peak extra memory is the largest RSS growth over
the RSS after the data is built, sampled every 2 ms from /proc/self/statm by a thread.
Prints a markdown table and headreg's time per stage.

    PYTHONPATH=. python benchmarks/bench_eval.py --sizes 10000,50000,100000 --repeats 1
    PYTHONPATH=. python benchmarks/bench_eval.py --sizes 50000 --methods floor,headreg --noise 50  # ~unclustered
    PYTHONPATH=. python benchmarks/bench_eval.py --sizes 100000 --default-metrics --threads 1
    PYTHONPATH=. python benchmarks/bench_eval.py --sizes 60502 --classes 11316 --class-sizes 2:12 --default-metrics
    PYTHONPATH=. python benchmarks/bench_eval.py --sizes 1000000 --methods verification
    PYTHONPATH=. python benchmarks/bench_eval.py --sizes 60502 --dim 512 --classes 11316 --class-sizes 2:12 \
        --methods floor,headreg,pml,faiss --threads 1 --repeats 3
    PYTHONPATH=. python benchmarks/bench_eval.py --query-gallery 14218,12612 --dim 512 --classes 3985 \
        --methods floor,headreg,pml,faiss --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

METHODS = ("floor", "mm_rows", "headreg", "pml")
DEFAULT_METHODS = ("floor", "default", "families")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Largest RSS growth over the RSS at entry, sampled by a background thread."""

    def __enter__(self) -> PeakRSS:
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def class_labels(n: int, classes: int, sizes: str | None, gen):  # noqa: ANN001, ANN201
    """`(n,)` labels: uniform over `classes`, or (sizes "lo:hi") classes of lo..hi samples summing to n."""
    import torch

    if not sizes:
        return torch.randint(0, classes, (n,), generator=gen)
    lo, hi = (int(v) for v in sizes.split(":"))
    if not classes * lo <= n <= classes * hi:
        raise SystemExit(f"--class-sizes {sizes}: {classes} classes cannot hold N={n}")
    counts = torch.full((classes,), lo)
    while int(counts.sum()) < n:  # add one sample at a time to random classes below hi
        room = (counts < hi).nonzero().squeeze(1)
        pick = room[torch.randperm(room.numel(), generator=gen)[: n - int(counts.sum())]]
        counts[pick] += 1
    labels = torch.repeat_interleave(torch.arange(classes), counts)
    return labels[torch.randperm(n, generator=gen)]


def make_data(n: int, dim: int, classes: int, noise: float, seed: int = 0, sizes: str | None = None):  # noqa: ANN201
    """Clustered unit vectors: a random unit centre per class plus isotropic noise of norm ~noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    labels = class_labels(n, classes, sizes, gen)
    x = centers[labels] + noise * torch.randn(n, dim, generator=gen) / dim**0.5
    return torch.nn.functional.normalize(x, dim=1), labels


def child(args: argparse.Namespace) -> None:
    """Run one method on one size; print one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = make_data(args.n, args.dim, args.classes, args.noise, sizes=args.class_sizes)
    q = args.num_queries  # 0: leave-one-out over all of x
    qx, qy, gx, gy = (x[:q], y[:q], x[q:], y[q:]) if q else (x, y, x, y)
    if args.method == "default":
        print(json.dumps(_default_cli(args, x, y)))
        return
    # Imports happen before timing and before the RSS baseline.
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    import headreg.metrics._kernels  # noqa: F401 - numba and llvmlite, imported lazily by headreg
    from headreg.metrics._knn import plan_chunks, similarity_tiles
    from headreg.metrics.retrieval import retrieval_metrics

    times, result, stats, extra = [], {}, {}, 0.0
    for _ in range(args.repeats):
        stats = {}
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if args.method == "floor":
                chunk, tile = plan_chunks(gx.shape[0])
                chunk = args.chunk_size or chunk
                buf = torch.empty(chunk, tile)
                for s in range(0, qx.shape[0], chunk):
                    for _ in similarity_tiles(qx[s : s + chunk], gx, tile, buf):
                        pass
            elif args.method == "faiss":
                import faiss

                faiss.omp_set_num_threads(args.threads or torch.get_num_threads())
                k = int(torch.bincount(gy).max()) + (0 if q else 1)  # + the query itself in leave-one-out
                index = faiss.IndexFlatIP(args.dim)
                index.add(gx.numpy())
                index.search(qx.numpy(), k)
            elif args.method == "mm_rows":
                chunk = max(8, (32 * 2**20) // (4 * args.n))
                buf = torch.empty(chunk, args.n)
                for s in range(0, args.n, chunk):
                    e = min(s + chunk, args.n)
                    torch.mm(x[s:e], x.T, out=buf[: e - s])
            elif args.method == "families":
                from headreg.metrics import compute_metrics

                result = compute_metrics(x, y, stats=stats)
            elif args.method == "verification":
                from headreg.metrics import verification_metrics

                result = verification_metrics(x, y)
            elif args.method == "headreg":
                gallery = (gx, gy) if q else (None, None)
                out = retrieval_metrics(
                    qx, qy, *gallery, recall_k=(1,), knn_k=1, chunk_size=args.chunk_size, stats=stats
                )
                result = {k: out[k] for k in ("precision_at_1", "r_precision", "mean_average_precision_at_r")}
            else:
                calc = AccuracyCalculator(
                    include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                    k="max_bin_count",
                    device=torch.device("cpu"),
                )
                result = calc.get_accuracy(qx, qy, gx, gy, ref_includes_query=False) if q else calc.get_accuracy(x, y)
            times.append(time.perf_counter() - t0)
        extra = max(extra, mem.extra_mib)
    print(json.dumps({"time": min(times), "result": result, "stats": stats, "extra_mib": extra}))


def _default_cli(args: argparse.Namespace, x, y) -> dict:  # noqa: ANN001
    """Time `headreg eval --embeddings FILE --json` (default metrics) as its own process."""
    import resource
    import tempfile

    from headreg.data.embeddings import save_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        path = save_embeddings(f"{tmp}/emb.safetensors", x, y)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else dict(os.environ)
        cmd = [os.path.join(os.path.dirname(sys.executable), "headreg"), "eval", "--embeddings", str(path), "--json"]
        times, out = [], {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise SystemExit(f"headreg eval failed:\n{proc.stderr}")
            out = json.loads(proc.stdout)["metrics"]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    keys = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "roc_auc", "nmi", "ami")
    return {"time": min(times), "result": {k: out[k] for k in keys if k in out}, "stats": {}, "extra_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,50000,100000", help="comma-separated N")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--noise", type=float, default=1.5, help="noise norm relative to the unit class centre")
    p.add_argument("--repeats", type=int, default=1, help="runs per method; the fastest is reported")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--default-metrics", action="store_true", help="time the whole default headreg eval")
    p.add_argument("--class-sizes", default=None, help="LO:HI samples per class (N must fit)")
    p.add_argument("--query-gallery", default=None, help="Q,G: time query/gallery (Q queries, G gallery)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--num-queries", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.default_metrics and args.methods == ",".join(METHODS):
        args.methods = ",".join(DEFAULT_METHODS)
    if args.child:
        args.method = args.child
        child(args)
        return
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"D={args.dim}, C={args.classes}, noise={args.noise}, repeats={args.repeats}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        flush=True,
    )
    rows, num_queries = [], 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.query_gallery:
        num_queries, num_gallery = (int(v) for v in args.query_gallery.split(","))
        if args.default_metrics or args.class_sizes:
            raise SystemExit("--query-gallery times retrieval only; drop --default-metrics / --class-sizes")
        sizes = [num_queries + num_gallery]
    for n in sizes:
        res = {}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", method, "--n", str(n), "--dim", str(args.dim)]
            cmd += ["--classes", str(args.classes), "--noise", str(args.noise), "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads), "--num-queries", str(num_queries)]
            if args.class_sizes:
                cmd += ["--class-sizes", args.class_sizes]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"{method} at N={n} failed")
            res[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            load = " ".join(f"{v:.2f}" for v in os.getloadavg())
            print(f"N={n} {method}: {res[method]['time']:.2f} s (load average after: {load})", flush=True)
        rows.append((n, res))
    print()
    print(
        "| N | method | time (s) | x floor | x mm_rows | speed-up vs PML | x faiss search | peak extra RSS (MiB) "
        "| P@1 | R-precision | MAP@R |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, res in rows:
        floor = res.get("floor", {}).get("time")
        for method, r in res.items():
            ratio = f"{r['time'] / floor:.2f}" if floor else "-"
            rows_time = res.get("mm_rows", {}).get("time")
            ratio_rows = f"{r['time'] / rows_time:.2f}" if rows_time else "-"
            speed = (
                f"{res['pml']['time'] / r['time']:.2f}" if "pml" in res and method not in ("floor", "mm_rows") else "-"
            )
            faiss_time = res.get("faiss", {}).get("time")
            ratio_faiss = f"{r['time'] / faiss_time:.2f}" if faiss_time else "-"
            m = r["result"]
            vals = [
                f"{m[k]:.6f}" if k in m else "-"
                for k in ("precision_at_1", "r_precision", "mean_average_precision_at_r")
            ]
            print(
                f"| {n} | {method} | {r['time']:.2f} | {ratio} | {ratio_rows} | {speed} | {ratio_faiss} "
                f"| {r['extra_mib']:.0f} | " + " | ".join(vals) + " |"
            )
    print()
    for n, res in rows:
        if "families" in res:
            st, total = res["families"]["stats"], res["families"]["time"]
            parts = ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f} %)" for k, v in st.items())
            print(f"default families at N={n}, in-process, {total:.2f} s: {parts}")
        if "default" in res and "floor" in res:
            ratio = res["default"]["time"] / res["floor"]["time"]
            print(f"N={n}: whole default headreg eval = {ratio:.2f} x the matmul floor")
        if "headreg" in res:
            st = res["headreg"]["stats"]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in st.items())
            print(f"headreg stages at N={n} (s; fallback_rows is a count): {parts}")
        if "headreg" in res and "pml" in res:
            a, b = res["headreg"]["result"], res["pml"]["result"]
            diff = max(abs(a[k] - b[k]) for k in a)
            print(f"N={n}: largest |headreg - PML| over the three metrics = {diff:.2e}")


if __name__ == "__main__":
    main()
