"""IJB-C-shaped 1:1 scoring: template features, 15.7 M template-pair scores and TAR@FAR, time and peak memory.

On synthetic data of IJB-C's shape (23,124 templates of 3,531 subjects, 15,658,489 template pairs, D = 512;
469,375 faces for the template step), times, each method in its own subprocess:

  templates      headreg.metrics.ijb.template_features: the faces' media means summed per template, normalised
  headreg        score_template_pairs (blocks of templates, the strategy chosen per block) + tar_at_far_nearest
                 (the ROC and insightface's nearest-FAR rule): what `headreg eval --dataset ijbc:DIR` runs after
                 extraction
  dense          the same with every block scored by one product against all templates
  gather         the same with every pair's two rows gathered (the way insightface's verification() scores)
  insightface    insightface's verification() (100,000-pair chunks of gathered rows, numpy) + scikit-learn
                 roc_curve + its nearest-FAR loop, restated here

`--pairs N` scores the first N pairs only (the peers are slow: run them on a subset, headreg on the same subset
and on all pairs). Peak extra memory is the largest RSS growth over the RSS after the data is built
(bench_eval.PeakRSS, sampled every 2 ms). Prints a markdown table.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_ijb.py --methods templates,headreg,dense
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_ijb.py --pairs 1000000 --methods headreg,gather,insightface
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("templates", "headreg", "dense", "gather", "insightface")
#: IJB-C's 1:1 protocol as insightface's meta files give it.
TEMPLATES, SUBJECTS, PAIRS, FACES = 23_124, 3_531, 15_658_489, 469_375


def make_data(args: argparse.Namespace):  # noqa: ANN201
    """Unit template features around per-subject centres; uniformly drawn pairs (~1 in 3,531 genuine)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    subject = torch.randint(0, SUBJECTS, (TEMPLATES,), generator=gen)
    centres = torch.randn(SUBJECTS, args.dim, generator=gen, dtype=torch.float64)
    noise = 2.5 * torch.randn(TEMPLATES, args.dim, generator=gen, dtype=torch.float64)  # TAR@1e-6 well below 1
    features = torch.nn.functional.normalize(centres[subject] + noise, dim=1)
    ids = torch.arange(TEMPLATES, dtype=torch.int64) * 3 + 1  # sparse ids, as IJB's
    index = torch.randint(0, TEMPLATES, (args.pairs, 2), generator=gen)
    same = subject[index[:, 0]] == subject[index[:, 1]]
    return ids, features, ids[index], same


def make_faces(args: argparse.Namespace):  # noqa: ANN201
    """FACES float32 embeddings; every template owns a face; about 3 faces a media."""
    import torch

    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(FACES, args.dim, generator=gen)
    templates = torch.cat([torch.arange(TEMPLATES), torch.randint(0, TEMPLATES, (FACES - TEMPLATES,), generator=gen)])
    medias = torch.randint(0, FACES // 3, (FACES,), generator=gen)
    scores = torch.rand(FACES, generator=gen)
    return emb, templates * 3 + 1, medias, scores


def run_method(method: str, args: argparse.Namespace) -> dict:
    import numpy as np
    from bench_eval import PeakRSS  # a sibling script

    from headreg.metrics.ijb import IJB_FAR_TARGETS, score_template_pairs, tar_at_far_nearest, template_features

    if method == "templates":
        emb, templates, medias, scores = make_faces(args)
        with PeakRSS() as mem:
            start = time.perf_counter()
            template_features(emb, templates, medias, scores)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "extra_mib": mem.extra_mib}
    ids, features, pairs, same = make_data(args)
    with PeakRSS() as mem:
        start = time.perf_counter()
        if method == "insightface":
            from sklearn.metrics import roc_curve

            feats, p1, p2 = features.numpy(), pairs[:, 0].numpy(), pairs[:, 1].numpy()
            template2id = np.zeros((int(ids.max()) + 1, 1), dtype=int)
            template2id[ids.numpy()] = np.arange(ids.numel())[:, None]
            score = np.zeros((len(p1),))
            for s in range(0, len(p1), 100_000):
                chunk = slice(s, s + 100_000)
                score[chunk] = np.sum(feats[template2id[p1[chunk]]] * feats[template2id[p2[chunk]]], -1).flatten()
            fpr, tpr, _ = roc_curve(same.numpy(), score)
            fpr, tpr = np.flipud(fpr), np.flipud(tpr)
            tars = [tpr[min(zip(abs(fpr - x), range(len(fpr)), strict=True))[1]] for x in IJB_FAR_TARGETS]
        else:
            strategy = "auto" if method == "headreg" else method
            score = score_template_pairs(ids, features, pairs, strategy=strategy)
            tars = list(tar_at_far_nearest(score, same)[0].values())
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_mib": mem.extra_mib, "tar": [round(float(t), 6) for t in tars]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="templates,headreg,dense", help=f"comma-separated from {METHODS}")
    parser.add_argument("--pairs", type=int, default=PAIRS, help="template pairs scored (IJB-C: 15,658,489)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; methods interleaved within each")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_method(args.one, args)))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown methods {bad}; choose from {METHODS}")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    here = os.path.dirname(os.path.abspath(__file__))
    for _ in range(args.repeats):
        for m in methods:
            cmd = [sys.executable, os.path.join(here, "bench_ijb.py"), "--one", m, "--pairs", str(args.pairs)]
            cmd += ["--dim", str(args.dim)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[m].append(json.loads(out.strip().splitlines()[-1]))
            print(m, results[m][-1], file=sys.stderr, flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"\n{args.pairs:,} pairs over {TEMPLATES:,} templates (templates: {FACES:,} faces), D={args.dim}, "
          f"OMP_NUM_THREADS={threads}, {args.repeats} round(s), best of them\n")  # fmt: skip
    print("| method | seconds | peak extra memory (MiB) | TAR@FAR 1e-6 ... 1e-1 |")
    print("|---|---|---|---|")
    for m in methods:
        best = min(results[m], key=lambda r: r["seconds"])
        tar = " ".join(f"{t:.4f}" for t in best.get("tar", [])) or "-"
        print(f"| {m} | {best['seconds']:.2f} | {max(r['extra_mib'] for r in results[m]):.0f} | {tar} |")


if __name__ == "__main__":
    main()
