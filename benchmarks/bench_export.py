"""An exported model on onnxruntime (CPU) beside PyTorch eager and torch.compile, in one run.

All three run the very same embedding network (``headreg.engine.export.ExportModule``: backbone + neck, no head)
in float32 on the CPU, on the same normalised random batches, with the same number of threads:

  eager     ``module(x)`` under ``torch.inference_mode``
  compile   ``torch.compile(module)`` (inductor, default mode), timed after its compilation
  ort       the file ``export_model`` writes (ONNX, dynamo exporter, verified), run by
            ``headreg.engine._onnx.OnnxModel`` (onnxruntime's CPU provider, ``intra_op_num_threads`` = torch's)

Each repeat times every engine once per batch size, in an order rotated per repeat, after one warm-up batch, so
load from other jobs hits all three alike. Noise only ever slows a pass down, so the table reports each engine's
best pass (images/s) and its ratio to eager, beside the median over the repeats.

    OMP_NUM_THREADS=2 python benchmarks/bench_export.py --models resnet18,iresnet50 --batch-sizes 1,64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

ENGINES = ("eager", "compile", "ort")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,iresnet50")
    p.add_argument("--image-size", type=int, default=112, help="H = W of every model (iresnet's is 112)")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--images", type=int, default=128, help="images per timed pass (at least one batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    p.add_argument("--engines", default=",".join(ENGINES))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import os

    import headreg
    from headreg.engine._onnx import load_onnx_model
    from headreg.engine.export import ExportModule, export_model

    engines = [e for e in args.engines.split(",") if e]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()}, "
          f"{args.image_size}x{args.image_size}, {args.images} images per pass, {args.repeats} repeats")  # fmt: skip
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for name in args.models.split(","):
        model = headreg.create_model(name).eval()
        module = ExportModule(model).eval()
        runners = {}
        if "eager" in engines:
            runners["eager"] = module
        if "compile" in engines:
            start = time.perf_counter()
            compiled = torch.compile(module)
            with torch.inference_mode():
                for b in sizes:
                    compiled(torch.randn(b, 3, args.image_size, args.image_size))
            print(f"{name}: torch.compile warm-up {time.perf_counter() - start:.1f}s")
            runners["compile"] = compiled
        if "ort" in engines:
            start = time.perf_counter()
            export_model(model, tmp / f"{name}.onnx", input_size=args.image_size)
            runners["ort"] = load_onnx_model(tmp / f"{name}.onnx")
            print(f"{name}: export + verification {time.perf_counter() - start:.1f}s")
        for b in sizes:
            x = torch.randn(b, 3, args.image_size, args.image_size)
            batches = max(1, args.images // b)
            best = {e: 0.0 for e in runners}
            per: dict[str, list[float]] = {e: [] for e in runners}
            with torch.inference_mode():
                for e in runners:
                    runners[e](x)  # warm-up
                for r in range(args.repeats):
                    order = list(runners)[r % len(runners) :] + list(runners)[: r % len(runners)]
                    for e in order:
                        start = time.perf_counter()
                        for _ in range(batches):
                            runners[e](x)
                        ips = batches * b / (time.perf_counter() - start)
                        per[e].append(ips)
                        best[e] = max(best[e], ips)
            base = best.get("eager") or 1.0
            for e in runners:
                rows.append((name, b, e, best[e], best[e] / base, statistics.median(per[e])))
                print(f"{name:<10} batch {b:>3}  {e:<8} best {best[e]:8.1f} img/s  x{best[e] / base:5.2f} eager  "
                      f"median {statistics.median(per[e]):8.1f}", flush=True)  # fmt: skip
    print(f"\nload average at the end {os.getloadavg()}\n")
    print("| model | batch | engine | best images/s | × eager | median images/s |")
    print("|---|---:|---|---:|---:|---:|")
    for name, b, e, ips, ratio, med in rows:
        print(f"| {name} | {b} | {e} | {ips:.1f} | {ratio:.2f} | {med:.1f} |")


if __name__ == "__main__":
    main()
