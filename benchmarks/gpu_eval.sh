#!/usr/bin/env bash
# headreg eval on a GPU, in one run:
#   1. embedding extraction images/s: resnet50, 224 px, batch 256, bf16 + channels_last (and fp32), headreg's loop
#      beside a bare timm loop (benchmarks/bench_extract.py);
#   2. retrieval metrics (P@1, R-precision, MAP@R, recall@k) at N = 1,000,000, D = 128, leave-one-out, beside the
#      floor: the same chunked N x N x D similarity matmul and nothing else.
# Without CUDA it runs both on the CPU at small sizes (a smoke run of the same code paths).
#
#   benchmarks/gpu_eval.sh                 # sizes picked from the hardware
#   N=200000 CLASSES=2000 benchmarks/gpu_eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda
    EXTRACT_ARGS=(--model resnet50 --image-size 224 --batch-size 256 --batches 12 --repeats 3 --modes bf16_cl,fp32)
    N=${N:-1000000}; DIM=${DIM:-128}; CLASSES=${CLASSES:-10000}
else
    DEVICE=cpu
    echo "no CUDA device: running the CPU smoke sizes" >&2
    EXTRACT_ARGS=(--model resnet18 --image-size 112 --batch-size 16 --batches 2 --repeats 1 --modes fp32,bf16_cl)
    N=${N:-5000}; DIM=${DIM:-128}; CLASSES=${CLASSES:-100}
fi

echo "## headreg eval on $DEVICE"
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
echo
echo "### Extraction"
"$PY" benchmarks/bench_extract.py --device "$DEVICE" "${EXTRACT_ARGS[@]}"
echo
echo "### Retrieval metrics, N=$N, D=$DIM, $CLASSES classes, leave-one-out"
"$PY" - "$DEVICE" "$N" "$DIM" "$CLASSES" <<'EOF'
import sys, time

import torch
import torch.nn.functional as F

from headreg.metrics import retrieval_metrics
from headreg.metrics._knn import plan_chunks, similarity_tiles

device, n, dim, classes = torch.device(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


g = torch.Generator(device="cpu").manual_seed(0)
labels = torch.randint(0, classes, (n,), generator=g)
centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
emb = (centres[labels] + 1.5 / dim**0.5 * torch.randn(n, dim, generator=g)).to(device)
labels = labels.to(device)


def floor() -> float:
    q = F.normalize(emb, dim=1)
    chunk, tile = plan_chunks(n, device)  # the chunks and tiles headreg's k-NN uses on this device
    sync()
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        for _ in similarity_tiles(q[s : s + chunk], q, tile):
            pass
    sync()
    return time.perf_counter() - t0


def headreg() -> tuple[float, dict, dict]:
    stats: dict[str, float] = {}
    sync()
    t0 = time.perf_counter()
    out = retrieval_metrics(emb, labels, device=device, stats=stats)
    sync()
    return time.perf_counter() - t0, out, stats


retrieval_metrics(emb[:2000], labels[:2000], device=device)  # warm-up: kernels, allocator
floor_s = floor()
head_s, out, stats = headreg()
if device.type == "cuda":
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
print()
print("| N | D | classes | floor matmul (s) | headreg retrieval (s) | ratio | P@1 | MAP@R | R-precision |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
print(
    f"| {n:,} | {dim} | {classes} | {floor_s:.2f} | {head_s:.2f} | {head_s / floor_s:.2f} | "
    f"{out['precision_at_1']:.4f} | {out['mean_average_precision_at_r']:.4f} | {out['r_precision']:.4f} |"
)
print()
print("headreg stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stats.items()))
EOF
