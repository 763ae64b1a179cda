"""One training step of every head beside the floor and beside pytorch-metric-learning, in one run.

A step is forward + backward through the embeddings and the class weights at batch B,
width D and C classes, float32 on the CPU. The floor is ``F.linear`` + ``F.cross_entropy``.
Times are medians over alternating repeats (round robin, so machine noise hits every
method alike); ratios to the floor are what to read: the ratio of the medians, the median of the
per-round ratios and the ratio of the fastest steps (the least disturbed on a loaded machine).
Peak extra memory is measured in a fresh subprocess per method as the growth of the peak RSS
over two steps after a warm-up step.
The angular heads are also checked against a straightforward float64-free formulation
(normalise both, matmul, margin, cross-entropy) for equal loss and gradients.

    python benchmarks/bench_heads.py --classes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")

HEADS = ["softmax", "modified_softmax", "normface", "sphereface", "arcface", "cosface", "combined", "center"]
ANGULAR = ["normface", "sphereface", "arcface", "cosface", "combined"]
PML = {
    "pml_arcface": "ArcFaceLoss",
    "pml_cosface": "CosFaceLoss",
    "pml_sphereface": "SphereFaceLoss",
    "pml_normalized_softmax": "NormalizedSoftmaxLoss",
}


def make_step(method: str, B: int, D: int, C: int) -> Callable[[], None]:
    """Build tensors and return a closure doing one forward + backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g)
    if method == "floor":
        w = (torch.randn(C, D, generator=g) * 0.01).requires_grad_(True)

        def step() -> None:
            F.cross_entropy(F.linear(x, w), y).backward()
            x.grad = w.grad = None

        return step
    if method == "unfused_arcface":
        # headreg's pipeline before the fusion: cosine matrix kept for backward, logits, softmax.
        from headreg.heads.functional import arcface_margin, cosine_linear, target_logit

        w = (torch.randn(C, D, generator=g) * 0.01).requires_grad_(True)

        def step() -> None:
            cos = cosine_linear(x, w)
            target = arcface_margin(target_logit(cos, y), 0.5)
            logits = (cos * 64.0).scatter_(1, y[:, None], (target * 64.0)[:, None])
            F.cross_entropy(logits, y).backward()
            x.grad = w.grad = None

        return step
    if method == "naive_arcface":
        w = (torch.randn(C, D, generator=g) * 0.01).requires_grad_(True)
        s, m = 64.0, 0.5

        def step() -> None:
            cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
            t = cos.gather(1, y[:, None])
            sin = (1 - t * t).clamp_min(1e-7).sqrt()
            phi = torch.where(t > math.cos(math.pi - m), t * math.cos(m) - sin * math.sin(m), t - m * math.sin(m))
            logits = cos.scatter(1, y[:, None], phi) * s
            F.cross_entropy(logits, y).backward()
            x.grad = w.grad = None

        return step
    if method in PML:
        from pytorch_metric_learning import losses

        loss_fn = getattr(losses, PML[method])(num_classes=C, embedding_size=D)

        def step() -> None:
            loss_fn(x, y).backward()
            x.grad = None
            loss_fn.W.grad = None

        return step
    import headreg

    head = headreg.create_head(method, D, C).train()

    def step() -> None:
        head(x, y).loss.backward()
        x.grad = None
        head.zero_grad(set_to_none=True)

    return step


def check_equal_to_straightforward(D: int, C: int) -> dict[str, float]:
    """Max relative difference of loss and gradients: headreg's arcface vs the straightforward formulation."""
    import headreg

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, D, generator=g)
    y = torch.randint(0, C, (64,), generator=g)
    head = headreg.create_head("arcface", D, C)
    x1 = x.clone().requires_grad_(True)
    loss1 = head(x1, y).loss
    loss1.backward()
    w2 = head.weight.detach().clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    cos = F.linear(F.normalize(x2), F.normalize(w2))
    t = cos.gather(1, y[:, None])
    sin = (1 - t * t).clamp_min(torch.finfo(t.dtype).eps).sqrt()
    m = 0.5
    phi = torch.where(t > math.cos(math.pi - m), t * math.cos(m) - sin * math.sin(m), t - m * math.sin(m))
    loss2 = F.cross_entropy(cos.scatter(1, y[:, None], phi) * 64.0, y)
    loss2.backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    return {"loss": rel(loss1, loss2), "grad_x": rel(x1.grad, x2.grad), "grad_w": rel(head.weight.grad, w2.grad)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(step: Callable[[], None], steps: int = 2) -> int:
    """Peak RSS growth over ``steps`` steps, after a warm-up step (Linux: resets VmHWM via clear_refs)."""
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark to the current RSS
    base = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    return (_status_kib("VmHWM") - base) * 1024


def measure_memory(method: str, B: int, D: int, C: int) -> int:
    """Peak extra memory of one method, in a fresh subprocess so methods do not share allocator caches."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import bench_heads as b; "
        f"print(b.peak_extra_bytes(b.make_step({method!r}, {B}, {D}, {C})))"
    )
    # A fixed mmap threshold makes glibc return every large block to the OS on free, so
    # RSS follows live tensors instead of the allocator's dynamic caching.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", default="10000,100000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-pml", action="store_true", help="skip pytorch-metric-learning")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    methods = ["floor", "naive_arcface", "unfused_arcface", *HEADS]
    if not args.no_pml:
        try:
            import pytorch_metric_learning  # noqa: F401

            methods += list(PML)
        except ImportError:
            print("pytorch-metric-learning not installed: skipping its losses")
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - set(methods))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {methods}")
        methods = ["floor", *[m for m in wanted if m != "floor"]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch}, D={args.dim}")
    results = []
    for C in [int(c) for c in args.classes.split(",")]:
        steps = {m: make_step(m, args.batch, args.dim, C) for m in methods}
        for step in steps.values():
            step()  # warm-up
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for m in methods:
                t0 = time.perf_counter()
                steps[m]()
                times[m].append(time.perf_counter() - t0)
        del steps
        mem = {m: None if args.no_memory else measure_memory(m, args.batch, args.dim, C) for m in methods}
        floor_t = statistics.median(times["floor"])
        floor_m = mem["floor"]
        eq = check_equal_to_straightforward(args.dim, C)
        print(f"\n### C = {C:,}\n")
        print(f"arcface vs straightforward formulation, relative difference: {json.dumps(eq)}\n")
        print(
            "| method | median step (ms) | × floor | × floor, per round | min step (ms) | × floor's min "
            "| peak extra memory (MiB) | × floor's |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        floor_min = min(times["floor"])
        for m in methods:
            t = statistics.median(times[m])
            # Each round runs every method back to back: the median of the per-round ratios cancels
            # the slow drifts of a loaded machine better than the ratio of the medians.
            paired = statistics.median(a / b for a, b in zip(times[m], times["floor"], strict=True))
            mm = mem[m]
            mem_txt = "n/a" if mm is None else f"{mm / 2**20:.0f}"
            mem_ratio = "n/a" if mm is None or not floor_m else f"{mm / floor_m:.2f}"
            t_min = min(times[m])
            print(
                f"| {m} | {t * 1e3:.0f} | {t / floor_t:.2f} | {paired:.2f} | {t_min * 1e3:.0f} | "
                f"{t_min / floor_min:.2f} | {mem_txt} | {mem_ratio} |"
            )
            results.append(
                {
                    "classes": C,
                    "method": m,
                    "median_s": t,
                    "ratio": t / floor_t,
                    "paired_ratio": paired,
                    "min_s": t_min,
                    "min_ratio": t_min / floor_min,
                    "times_s": times[m],
                    "peak_extra_bytes": mm,
                }
            )
        results.append({"classes": C, "equality_vs_straightforward": eq})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
