"""Run one function on W spawned processes joined by a file rendezvous, and collect what each returns.

Shared by the ``bench_scale.py`` benchmarks that time the distributed engine (``_scale_head``, ``_scale_sampling``).
``run(rank, cfg, init_method)`` is a module-level function (spawned processes import it by name); it initialises
and destroys its own process group and returns a JSON-ready dict with ``"rank"``.
"""

from __future__ import annotations

import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

Run = Callable[[int, dict[str, Any], str], dict[str, Any]]


def _worker(run: Run, rank: int, cfg: dict[str, Any], init: str, results: Any) -> None:
    try:
        results.put(run(rank, cfg, init))
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})
        raise


def launch_ranks(run: Run, cfg: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """``run`` on ``cfg["world"]`` processes; their results by rank. A failed or late rank raises RuntimeError."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        procs = [ctx.Process(target=_worker, args=(run, r, cfg, init, results)) for r in range(cfg["world"])]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        out = []
        while not results.empty():
            out.append(results.get())
    errors = [r["error"] for r in out if "error" in r]
    if errors or len(out) != cfg["world"]:
        raise RuntimeError("a worker failed:\n" + ("\n".join(errors) or f"{len(out)} of {cfg['world']} reported"))
    return sorted(out, key=lambda r: r["rank"])
