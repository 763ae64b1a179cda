"""Scale benchmarks, one entry point: ``python benchmarks/bench_scale.py PART [options]``.

Parts:
    head  the sharded margin head's training step against the replicated DDP head
          (benchmarks/_scale_head.py)
    knn   gallery-sharded exact k-NN against one process (benchmarks/_scale_knn.py)
    sampling  the sharded head's test accuracy with sampled negatives, r = 1, 0.5, 0.1
          (benchmarks/_scale_sampling.py)
    save  saving and resuming a sharded head's run on a chain of world sizes: memory per rank
          and time (benchmarks/_scale_save.py)

Each part launches its own worker processes (gloo on CPU) and prints a table of ratios
measured side by side in one run; ``--help`` after the part lists its options.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PARTS = {"head": "_scale_head", "knn": "_scale_knn", "sampling": "_scale_sampling", "save": "_scale_save"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PARTS:
        print(__doc__, file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module = importlib.import_module(PARTS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
