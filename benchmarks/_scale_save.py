"""Saving and resuming a class-sharded head's run: memory per rank and time, the world size changing as it goes.

``python benchmarks/bench_scale.py save [options]`` (``--help`` lists them). A chain of world sizes (default
``2,4,1``): the first launches W ranks (gloo on CPU) that build LeNet++ with a sharded ArcFace head of
``C × D`` and SGD with momentum (its state: one more ``C × D``, the momentum of every row), then save as
``headreg train`` does (``RunDir.save_model`` and ``RunDir.save_state`` of ``train_state``: one file per
rank). Each next link launches its W ranks, resumes that state (``RunDir.load_state`` reading this rank's
rows, ``load_train_state``), checks the head and its momentum are the saved ones (sums over the ranks), and
saves again.

Reported per link, the largest over the ranks: the resident memory once the model and the optimiser state
are built (``built``), how far memory rose above that while loading and while saving, the seconds each took,
and, for comparison, what gathering the logical head and its momentum on rank 0 held: ``4·C·D·2`` bytes (what
headreg did before per-rank files). The rise is the anonymous memory's peak (``RssAnon`` sampled each
millisecond: what the process allocated), and in brackets the resident peak (``VmHWM``, reset before each by
``/proc/self/clear_refs``), which also counts the file pages safetensors maps while reading, pages the
kernel can drop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _gloo import launch_ranks
from _scale_head import _reset_peak, _status_kib

GIB = 2**30


def _rss_gib(field: str = "VmRSS") -> float:
    return _status_kib(field) / 2**20


class _AnonPeak:
    """The peak of this process's anonymous resident memory (``RssAnon``: what it allocated, not the file pages
    safetensors maps, which the kernel can drop), sampled every millisecond by a thread while in the block."""

    def __enter__(self) -> _AnonPeak:
        self.base = self.peak = _rss_gib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_gib("RssAnon"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_gib("RssAnon"))

    @property
    def rise(self) -> float:
        return self.peak - self.base


def _sums(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    """The head's weight and its momentum summed over every rank's rows (float64): what a reload must equal."""
    w = model.head.inner.weight
    m = opt.state[w]["momentum_buffer"]
    t = torch.stack([w.detach().double().sum(), m.double().sum()])
    dist.all_reduce(t)
    return t.tolist()


def _run(rank: int, cfg: dict[str, Any], init: str) -> dict[str, Any]:
    torch.set_num_threads(max(1, cfg["threads"] // cfg["world"]))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=cfg["world"])
    try:
        import headreg
        from headreg.engine._rundir import RunDir
        from headreg.engine._shard_head import load_train_state, train_state

        torch.manual_seed(0)
        model = headreg.create_model("lenetpp", "arcface", num_classes=cfg["classes"], embedding_dim=cfg["dim"],
                                     shard_head=True, widths=[4, 8, 8])  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        run = RunDir(cfg["dir"])
        out: dict[str, Any] = {"rank": rank, "rows": model.head.hi - model.head.lo}
        if cfg["load"]:
            for p in model.parameters():  # the momentum buffers exist, as after any step, before the peak is reset
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
            out["built_gib"] = _rss_gib()
            out["peak_reset"] = _reset_peak()
            t0 = time.perf_counter()
            with _AnonPeak() as anon:
                state = run.load_state(rank=rank, world_size=cfg["world"])
                load_train_state(model, opt, state["model"], state["optimizer"], torch.device("cpu"))
                del state
            out["load_s"] = time.perf_counter() - t0
            out["load_rise_gib"] = _rss_gib("VmHWM") - out["built_gib"]
            out["load_anon_rise_gib"] = anon.rise
        else:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out["built_gib"] = _rss_gib()
        out["sums"] = _sums(model, opt)
        out["peak_reset"] = _reset_peak() and out.get("peak_reset", True)
        base = _rss_gib()
        t0 = time.perf_counter()
        with _AnonPeak() as anon:
            model_state, opt_state, split = train_state(model, opt)
            run.save_model(model, {"epoch": 1})
            state: dict[str, Any] = {"model": model_state, "optimizer": opt_state}
            if rank == 0:
                progress = {"epoch": 1, "global_step": 1, "steps_per_epoch": 1, "world_size": cfg["world"]}
                state.update(progress={**progress, "tally": None}, rng=[], transform_rng=[])
            run.save_state(state, split)
            del state, model_state, opt_state
        out["save_s"] = time.perf_counter() - t0
        out["save_rise_gib"] = _rss_gib("VmHWM") - base
        out["save_anon_rise_gib"] = anon.rise
        return out
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_scale.py save", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chain", default="2,4,1", help="world sizes: save on the first, resume and save on each next")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    parser.add_argument("--dir", help="where the run's files go (default: a temporary directory, removed after)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per link")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    chain = [int(w) for w in args.chain.split(",")]
    directory = Path(args.dir or tempfile.mkdtemp(prefix="headreg-save-"))
    logical = 4 * args.classes * args.dim * 2 / GIB
    print(f"torch {torch.__version__}, gloo, C={args.classes:,}, D={args.dim}, SGD momentum; "
          f"the logical head + momentum: {logical:.2f} GiB")  # fmt: skip
    rows, saved = [], None
    try:
        for i, world in enumerate(chain):
            cfg = {**vars(args), "world": world, "load": i > 0, "dir": str(directory)}
            ranks = launch_ranks(_run, cfg, args.timeout)
            sums = ranks[0]["sums"]
            # float64 sums of the same values grouped over another number of ranks: equal to rounding
            if saved is not None and any(
                abs(a - b) > 1e-12 * max(abs(b), 1.0) for a, b in zip(sums, saved, strict=True)
            ):
                raise SystemExit(f"W={world}: the resumed head sums to {sums}, the saved one to {saved}")
            saved = sums
            files = sorted(p for p in directory.glob("resume-*-of-*.safetensors"))
            row = {
                "world": world,
                "resumed_from": chain[i - 1] if i else None,
                "shard_gib": max(r["rows"] for r in ranks) * args.dim * 4 * 2 / GIB,
                "built_gib": max(r["built_gib"] for r in ranks),
                "load_rise_gib": max(r.get("load_rise_gib", 0.0) for r in ranks) if i else None,
                "load_anon_rise_gib": max(r.get("load_anon_rise_gib", 0.0) for r in ranks) if i else None,
                "load_s": max(r["load_s"] for r in ranks) if i else None,
                "save_anon_rise_gib": max(r["save_anon_rise_gib"] for r in ranks),
                "save_rise_gib": max(r["save_rise_gib"] for r in ranks),
                "save_s": max(r["save_s"] for r in ranks),
                "resume_files_gib": [round(p.stat().st_size / GIB, 3) for p in files],
                "peak_reset": all(r["peak_reset"] for r in ranks),
                "ranks": ranks,
            }
            rows.append(row)
            load = f", load +{row['load_rise_gib']:.2f} GiB in {row['load_s']:.1f} s" if i else ""
            print(f"W={world}: built {row['built_gib']:.2f} GiB/rank, save +{row['save_rise_gib']:.2f} GiB "
                  f"in {row['save_s']:.1f} s{load}")  # fmt: skip
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    print()
    print(_table(rows, logical))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "logical_gib": logical, "rows": rows}, indent=1))
    return 0


def _table(rows: list[dict[str, Any]], logical: float) -> str:
    lines = [
        "| W | resumed from | shard (head + momentum) / rank | RSS built | load: anon. peak rise (RSS) | load s | "
        "save: anon. peak rise (RSS) | save s | gathered on rank 0 (before) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        load = f"{r['load_anon_rise_gib']:.2f} ({r['load_rise_gib']:.2f}) GiB" if r["resumed_from"] else "–"
        load_s = f"{r['load_s']:.1f}" if r["resumed_from"] else "–"
        lines.append(
            f"| {r['world']} | {r['resumed_from'] or '–'} | {r['shard_gib']:.2f} GiB | {r['built_gib']:.2f} GiB | "
            f"{load} | {load_s} | {r['save_anon_rise_gib']:.2f} ({r['save_rise_gib']:.2f}) GiB | {r['save_s']:.1f} | "
            f"{logical:.2f} GiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
