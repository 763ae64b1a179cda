"""benchmarks/bench_scale.py's head and sampling parts run end to end at tiny sizes (so they do not rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_scale_head_benchmark_smoke(tmp_path):
    out = tmp_path / "head.json"
    args = ["--classes", "50", "--dim", "8", "--batch", "12", "--worlds", "1,2", "--steps", "1", "--warmup", "0"]
    proc = _bench("head", *args, "--threads", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world"], r["mode"]) for r in rows] == [
        (w, m) for w in (1, 2) for m in ("replicated", "sharded r=1", "sharded r=0.1")
    ]
    for r in rows:
        assert r["step_ms"] > 0 and r["rss_peak_gib"] >= r["rss_built_gib"] > 0 and len(r["ranks"]) == r["world"]
    # One process, r = 1: the sharded head's first loss is the replicated one's (same data, same initial weights).
    losses = {r["mode"]: r["loss"] for r in rows if r["world"] == 1}
    assert losses["sharded r=1"] == pytest.approx(losses["replicated"], rel=1e-5)
    assert "| 2 | sharded r=0.1 |" in proc.stdout
    # Over the memory budget: skipped and said so, not run
    _bench("head", *args, "--memory-budget", "0.001", "--json", str(out))
    assert all("skipped" in r for r in json.loads(out.read_text())["rows"])


@pytest.mark.slow
def test_scale_sampling_benchmark_smoke(tmp_path):
    out = tmp_path / "sampling.json"
    _bench("sampling", "--classes", "20", "--train-per-class", "4", "--test-per-class", "2", "--batch", "8",
           "--epochs", "1", "--rates", "1,0.5", "--json", str(out))  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["sample_rate"] for r in rows] == [1.0, 0.5] and [r["kept_per_rank"] for r in rows] == [10, 5]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 10 for r in rows)


@pytest.mark.slow
def test_scale_save_benchmark_smoke(tmp_path):
    """Save on 2 ranks, resume and save on 3, then on 1: each link checks the resumed head is the saved one."""
    out = tmp_path / "save.json"
    proc = _bench("save", "--classes", "50", "--dim", "8", "--chain", "2,3,1", "--threads", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world"], r["resumed_from"]) for r in rows] == [(2, None), (3, 2), (1, 3)]
    for r in rows:
        assert len(r["ranks"]) == r["world"] and r["save_s"] > 0 and len(r["resume_files_gib"]) == r["world"]
    assert "| 3 | 2 |" in proc.stdout
