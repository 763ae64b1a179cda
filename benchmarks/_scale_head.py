"""The class-sharded ArcFace head's training step against the replicated DDP head, side by side in one run.

``python benchmarks/bench_scale.py head [options]`` (``--help`` lists them). For each world size W (default
1, 2, 4) it launches W worker processes (gloo on CPU, NCCL with ``--device cuda``) three times:

- ``replicated``: DDP over a ``D → D`` linear "backbone" and the whole ``(C, D)`` ArcFace head, as
  ``headreg train`` without ``--shard-head`` trains it (every rank holds the head, its gradient and its
  optimiser state; DDP all-reduces the ``(C, D)`` gradient);
- ``sharded r=1`` and ``sharded r=0.1``: DDP over the linear only, the head a
  :class:`~headreg.heads._sharded.ShardedHead` (``C/W`` rows per rank, embeddings and labels all-gathered,
  the fused margin cross-entropy with its ``(B,)`` all-reduces), with ``headreg train``'s optimiser hook
  that steps the sampled rows only.

A step is forward, backward and the optimiser step at a global batch of ``--batch`` (``B/W`` per rank).
Reported per configuration: the median step time over ``--steps`` timed steps (after ``--warmup``), the
resident memory per rank once the model and optimiser are built, and its peak during the steps (the peak
is reset after construction, so the sharded head's transient whole-head initialisation is not counted;
``/proc/self/clear_refs``), the largest over the ranks; on CUDA the peak allocated device memory. A
configuration whose estimated memory (all ranks together) exceeds ``--memory-budget`` GiB is skipped and
says so. Defaults are the issue's sizes: C = 1,000,000, D = 512, B = 256, plain SGD (no optimiser state).

    python benchmarks/bench_scale.py head --classes 20000 --steps 3        # a smoke run
    python benchmarks/bench_scale.py head --json scale_head.json           # the full sizes (~20 GiB)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _gloo import launch_ranks

GIB = 2**30
MODES = {"replicated": None, "sharded r=1": 1.0, "sharded r=0.1": 0.1}


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "sgd-momentum" else 0.0)


class _Replicated(torch.nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        from headreg.registry import create_head

        self.embedder = torch.nn.Linear(dim, dim)
        self.head = create_head("arcface", dim, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(x), labels).loss


def _run(rank: int, cfg: dict[str, Any], init: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    world, dim, classes, batch = cfg["world"], cfg["dim"], cfg["classes"], cfg["batch"]
    torch.set_num_threads(max(1, cfg["threads"] // world))
    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(cfg["backend"], init_method=init, rank=rank, world_size=world)
    try:
        from headreg.engine._shard_head import hold_unsampled_rows
        from headreg.heads._sharded import ShardedHead
        from headreg.registry import create_head, list_heads

        # What is imported lazily (plugins; torch.optim's first use imports torch._dynamo, ~0.17 GiB) is not
        # the head's memory: done before the baseline.
        list_heads()
        _optimizer(cfg["optimizer"], [torch.zeros(1, requires_grad=True)], 0.1)
        torch.manual_seed(0)
        rss_start = _status_kib("VmRSS")
        ids = [rank] if cuda else None
        if cfg["mode"] == "replicated":
            model = _Replicated(dim, classes).to(device)
            ddp = DDP(model, device_ids=ids) if world > 1 else model
            params = list(model.parameters())

            def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return ddp(x, y)

            kept_head = None
        else:
            embedder = torch.nn.Linear(dim, dim).to(device)
            head = ShardedHead(
                lambda n: create_head("arcface", dim, n), "arcface", dim, classes, sample_rate=cfg["rate"]
            ).to(device)
            ddp = DDP(embedder, device_ids=ids) if world > 1 else embedder
            params = [*embedder.parameters(), *head.parameters()]

            def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return head(ddp(x), y).loss

            kept_head = head
        opt = _optimizer(cfg["optimizer"], params, 0.1)
        if kept_head is not None and kept_head.sample_rate < 1.0:
            hold_unsampled_rows(opt, kept_head)  # as headreg train does: rows not sampled are not updated
        per_rank = batch // world
        g = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(per_rank, dim, generator=g).to(device)
        import gc

        gc.collect()
        rss_built = _status_kib("VmRSS")
        reset = _reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for step in range(cfg["warmup"] + cfg["steps"]):
            y = torch.randint(0, classes, (per_rank,), generator=g).to(device)
            if cuda:
                torch.cuda.synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_of(x, y)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize(device)
            if step >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
        out = {
            "rank": rank,
            "rss_start_gib": rss_start / 2**20,
            "rss_built_gib": rss_built / 2**20,
            "rss_peak_gib": _status_kib("VmHWM") / 2**20,
            "peak_reset": reset,
            "step_s": times,
            "loss": float(loss.detach()),
        }
        if cuda:
            out["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        return out
    finally:
        dist.destroy_process_group()


def _estimate_gib(mode: str, rate: float | None, world: int, args: argparse.Namespace) -> float:
    """Memory of all ranks together for one configuration (host RAM on CPU), a rough upper bound."""
    c, d, b = args.classes, args.dim, args.batch
    state = {"sgd": 0, "sgd-momentum": 1, "adamw": 2}[args.optimizer]
    if mode == "replicated":
        # weight, gradient, DDP's gradient bucket copy, optimiser state; the (B/W, C) fused buffer
        per = 4 * c * d * (3 + state) + 4 * (b // world) * c
    else:
        from headreg.heads._sharded import EXACT_INIT_MAX

        local = -(-c // world)
        kept = local if rate is None or rate >= 1 else max(int(rate * local), 1)
        # weight, gradient, state; below r = 1 the kept rows' copies (forward, and the hooked step); buffer
        copies = 0 if kept == local else 4 * kept * d * (4 + 2 * state)
        per = 4 * local * d * (2 + state) + copies + 4 * b * kept
        if c * d <= EXACT_INIT_MAX:  # a small head is drawn whole on every rank first (transient)
            per = max(per, 4 * c * d * 2)
    return world * (per / GIB + 0.5)  # + the interpreter and torch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_scale.py head", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="global batch (B/W per rank)")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}")
    parser.add_argument("--optimizer", choices=["sgd", "sgd-momentum", "adamw"], default="sgd")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", help="gloo (default on cpu) or nccl (default on cuda)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    parser.add_argument("--memory-budget", type=float, help="GiB all ranks may use (default: 85%% of MemAvailable)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    budget = args.memory_budget
    if budget is None:
        budget = 0.85 * _status_meminfo_gib() if args.device == "cpu" else float("inf")
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        parser.error(f"--worlds {args.worlds} needs {max(worlds)} GPUs; {torch.cuda.device_count()} visible")
    print(
        f"torch {torch.__version__}, {args.device} ({backend}), {args.threads} threads shared by the ranks, "
        f"C={args.classes:,}, D={args.dim}, global batch {args.batch}, optimiser {args.optimizer}"
    )
    rows = []
    for world in worlds:
        for mode in modes:
            rate = MODES[mode]
            need = _estimate_gib(mode, rate, world, args)
            row: dict[str, Any] = {"world": world, "mode": mode, "estimated_gib": round(need, 2)}
            if args.device == "cpu" and need > budget:
                row["skipped"] = f"needs about {need:.1f} GiB over {world} ranks, over the {budget:.1f} GiB budget"
                print(f"W={world} {mode}: skipped ({row['skipped']})", file=sys.stderr)
                rows.append(row)
                continue
            cfg = {**vars(args), "world": world, "mode": mode, "rate": rate or 1.0, "backend": backend}
            ranks = launch_ranks(_run, cfg, cfg["timeout"])
            step = statistics.median(statistics.median(r["step_s"]) for r in ranks)
            row.update(
                step_ms=1000 * step,
                rss_built_gib=max(r["rss_built_gib"] for r in ranks),
                rss_peak_gib=max(r["rss_peak_gib"] for r in ranks),
                rss_start_gib=max(r["rss_start_gib"] for r in ranks),
                grown_gib=max(r["rss_peak_gib"] - r["rss_start_gib"] for r in ranks),
                peak_reset=all(r["peak_reset"] for r in ranks),
                loss=ranks[0]["loss"],
                ranks=ranks,
            )
            if "cuda_peak_gib" in ranks[0]:
                row["cuda_peak_gib"] = max(r["cuda_peak_gib"] for r in ranks)
            print(f"W={world} {mode}: {1000 * step:.1f} ms/step, peak RSS/rank {row['rss_peak_gib']:.2f} GiB")
            rows.append(row)
    print()
    print(_table(rows, args.device == "cuda"))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "backend": backend, "rows": rows}, indent=1))
    return 0


def _status_meminfo_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 8.0


def _table(rows: list[dict[str, Any]], cuda: bool) -> str:
    head = (
        "| W | head | ms / step | vs replicated | RSS after build / rank (GiB) | peak RSS / rank (GiB) "
        "| peak − RSS before build / rank (GiB) |"
    )
    sep = "|---:|---|---:|---:|---:|---:|---:|"
    if cuda:
        head, sep = head + " peak GPU / rank (GiB) |", sep + "---:|"
    lines = [head, sep]
    base = {r["world"]: r["step_ms"] for r in rows if r["mode"] == "replicated" and "step_ms" in r}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['world']} | {r['mode']} | skipped: {r['skipped']} | | | | |" + (" |" if cuda else ""))
            continue
        ratio = f"{r['step_ms'] / base[r['world']]:.2f}" if r["world"] in base else "–"
        line = (
            f"| {r['world']} | {r['mode']} | {r['step_ms']:.1f} | {ratio} | {r['rss_built_gib']:.2f} | "
            f"{r['rss_peak_gib']:.2f} | {r['grown_gib']:.2f} |"
        )
        if cuda:
            line += f" {r.get('cuda_peak_gib', float('nan')):.2f} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
