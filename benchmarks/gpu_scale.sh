#!/usr/bin/env bash
# The class-sharded ArcFace head against the replicated DDP head on GPUs, NCCL, in one run
# (benchmarks/_scale_head.py through benchmarks/bench_scale.py head): C = 1,000,000, D = 512, global batch 256,
# r = 1 and r = 0.1, W = 1, 2, 4, 8 processes (as many as there are GPUs); median step time and peak GPU
# memory per rank, as a markdown table and JSON (scale_head_gpu.json).
# Without CUDA it runs the same code on the CPU with gloo at a smoke size.
#
#   benchmarks/gpu_scale.sh                                  # sizes and world sizes from the hardware
#   CLASSES=2000000 OPTIMIZER=adamw benchmarks/gpu_scale.sh  # any of CLASSES DIM BATCH WORLDS OPTIMIZER STEPS
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# NCCL on one node: the defaults suit it; NCCL_DEBUG=INFO shows the transport it picked.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -gt 0 ]; then
    DEVICE=cuda
    WORLDS_DEFAULT=$("$PY" -c "print(','.join(str(w) for w in (1, 2, 4, 8) if w <= $GPUS))")
    CLASSES=${CLASSES:-1000000}; STEPS=${STEPS:-20}
else
    DEVICE=cpu
    echo "no CUDA device: running the CPU smoke size with gloo" >&2
    WORLDS_DEFAULT=1,2
    CLASSES=${CLASSES:-20000}; STEPS=${STEPS:-3}
fi

echo "## Class-sharded head on $DEVICE ($GPUS GPUs)"
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
echo
"$PY" benchmarks/bench_scale.py head --device "$DEVICE" --classes "$CLASSES" --dim "${DIM:-512}" \
    --batch "${BATCH:-256}" --worlds "${WORLDS:-$WORLDS_DEFAULT}" --optimizer "${OPTIMIZER:-sgd}" \
    --steps "$STEPS" --warmup 2 --json "${JSON:-scale_head_$DEVICE.json}"
