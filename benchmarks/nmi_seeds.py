"""NMI / AMI stability across k-means seeds, and what capping the Lloyd iterations costs.

On bench_eval.py's synthetic clustered embeddings (N samples, D dims, C classes, noise), runs
`clustering_metrics` for several seeds at several `max_iter` caps and prints mean ± sample
standard deviation. Reported in docs/metrics.md.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nmi_seeds.py --n 100000 --noise 1.5,3.0 --max-iter 20,100
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_eval import make_data  # noqa: I001 - a sibling script

from headreg.metrics.clustering import clustering_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--noise", default="1.5,3.0")
    p.add_argument("--max-iter", default="20,100")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| noise | max_iter | NMI mean ± sd | NMI min – max | AMI mean ± sd | s per run |")
    print("|---|---|---|---|---|---|")
    for noise in (float(v) for v in args.noise.split(",")):
        x, y = make_data(args.n, args.dim, args.classes, noise)
        for cap in (int(v) for v in args.max_iter.split(",")):
            nmi, ami, secs = [], [], []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                out = clustering_metrics(x, y, seed=seed, max_iter=cap)
                secs.append(time.perf_counter() - t0)
                nmi.append(out["nmi"])
                ami.append(out["ami"])
            print(
                f"| {noise} | {cap} | {statistics.mean(nmi):.5f} ± {statistics.stdev(nmi):.5f} "
                f"| {min(nmi):.5f} – {max(nmi):.5f} | {statistics.mean(ami):.5f} ± {statistics.stdev(ami):.5f} "
                f"| {statistics.mean(secs):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
