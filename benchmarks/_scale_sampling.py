"""Accuracy of the class-sharded ArcFace head with sampled negatives (``--sample-rate r``) on a fixed problem.

``python benchmarks/bench_scale.py sampling [options]``: synthetic Gaussian clusters (C classes in 64-D, class
centres drawn once, a fixed seed), a small MLP embedder (64 → 128 → D) trained with DDP and the sharded ArcFace
head on W gloo processes (default 2), SGD with momentum as Partial FC v2 uses, the same data order and initial
weights for every r; for each r (default 1, 0.5, 0.1) the test top-1 accuracy under the full head (all C
classes, margin-free, ties counting as hits; :meth:`ShardedHead.label_rank`), the last epoch's mean loss and
the median step time, as a markdown table and JSON.

    python benchmarks/bench_scale.py sampling                 # C = 2000, D = 32, 2 processes (~3 min)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _gloo import launch_ranks

IN = 64


def _data(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test points around C fixed centres (the same on every rank and for every r)."""
    g = torch.Generator().manual_seed(12345)
    c = cfg["classes"]
    centres = torch.nn.functional.normalize(torch.randn(c, IN, generator=g), dim=1) * 4.0
    y_train = torch.arange(c).repeat_interleave(cfg["train_per_class"])
    y_test = torch.arange(c).repeat_interleave(cfg["test_per_class"])
    x_train = centres[y_train] + cfg["noise"] * torch.randn(len(y_train), IN, generator=g)
    x_test = centres[y_test] + cfg["noise"] * torch.randn(len(y_test), IN, generator=g)
    return x_train, y_train, x_test, y_test


def _run(rank: int, cfg: dict[str, Any], init: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from headreg.engine._shard_head import hold_unsampled_rows
    from headreg.heads._sharded import ShardedHead
    from headreg.registry import create_head

    world = cfg["world"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x_train, y_train, x_test, y_test = _data(cfg)
        torch.manual_seed(0)  # the same embedder and head rows for every r
        embedder = torch.nn.Sequential(torch.nn.Linear(IN, 128), torch.nn.ReLU(), torch.nn.Linear(128, cfg["dim"]))
        options = {"scale": cfg["scale"], "margin": cfg["margin"]}
        head = ShardedHead(
            lambda n: create_head("arcface", cfg["dim"], n, **options),
            "arcface",
            cfg["dim"],
            cfg["classes"],
            sample_rate=cfg["rate"],
        )
        ddp = DDP(embedder) if world > 1 else embedder
        opt = torch.optim.SGD([*embedder.parameters(), *head.parameters()], lr=cfg["lr"], momentum=0.9)
        if cfg["rate"] < 1.0:
            hold_unsampled_rows(opt, head)
        torch.manual_seed(100 + rank)  # the negatives each rank samples (seeded, as headreg train's run seed)
        batch, n = cfg["batch"], len(y_train)
        steps_per_epoch = n // batch
        total = cfg["epochs"] * steps_per_epoch
        times, losses = [], []
        step = 0
        for epoch in range(cfg["epochs"]):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            losses = []
            for s in range(steps_per_epoch):
                idx = order[s * batch : (s + 1) * batch][rank::world]  # this rank's part of the global batch
                for group in opt.param_groups:  # cosine decay
                    group["lr"] = cfg["lr"] * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / total)).item())
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = head(ddp(x_train[idx]), y_train[idx]).loss
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
                losses.append(float(loss.detach()))
                step += 1
        embedder.eval()
        head.eval()
        with torch.no_grad():
            part = slice(rank * len(y_test) // world, (rank + 1) * len(y_test) // world)
            ranks = head.label_rank(embedder(x_test[part]), y_test[part])
        hits = torch.tensor([int((ranks == 0).sum()), ranks.numel()])
        dist.all_reduce(hits)
        return {
            "rank": rank,
            "accuracy": int(hits[0]) / int(hits[1]),
            "last_epoch_loss": statistics.fmean(losses),
            "step_ms": 1000 * statistics.median(times),
            "steps": step,
        }
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_scale.py sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1,0.5,0.1")
    parser.add_argument("--classes", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.5, help="standard deviation around the centres")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--scale", type=float, default=16.0)
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}; {args.classes} classes, {args.train_per_class} train + {args.test_per_class} "
        f"test points each in {IN}-D (noise {args.noise}), MLP → D={args.dim}, ArcFace s={args.scale:g} "
        f"m={args.margin:g}, SGD momentum 0.9 lr {args.lr:g} cosine, global batch {args.batch}, {args.epochs} "
        f"epochs, {args.world} gloo processes"
    )
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        ranks = launch_ranks(_run, {**vars(args), "rate": rate}, 3600)
        row = {
            "sample_rate": rate,
            "kept_per_rank": max(math.ceil(rate * (args.classes // args.world)), 1),
            "accuracy": ranks[0]["accuracy"],
            "last_epoch_loss": ranks[0]["last_epoch_loss"],
            "step_ms": statistics.median(r["step_ms"] for r in ranks),
            "steps": ranks[0]["steps"],
        }
        print(f"r={rate:g}: test top-1 {row['accuracy']:.4f}, {row['step_ms']:.2f} ms/step", file=sys.stderr)
        rows.append(row)
    print()
    print("| r | classes kept per rank (at least) | test top-1 (all classes) | last epoch loss | ms / step |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['sample_rate']:g} | {r['kept_per_rank']} | {r['accuracy']:.4f} | {r['last_epoch_loss']:.3f} | "
            f"{r['step_ms']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
