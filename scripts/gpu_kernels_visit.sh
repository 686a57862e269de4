#!/usr/bin/env bash
# One device visit for issue 12: GPU tests of glmc.kernels + the cuda backend, the kernel micro-benchmarks and GEMV
# sweep (-> $OUT/tuned_h200.json), then the cuda backend's decode tok/s at ChatGLM3-6B shape with the tuned table.
# Usage (device machine, repo root): bash scripts/gpu_kernels_visit.sh [LAYERS] [SWEEP: full|quick]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LAYERS=${1:-28}
SWEEP=${2:-full}
OUT=${OUT:-/tmp/visit-out}; mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/visit.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout 230 python3 benchmarks/bench_kernels.py --out "$OUT" $([ "$SWEEP" = quick ] && echo --quick) 2>&1 \
  | tee "$OUT/kernels.log" | grep -v "^{" | tail -45
timeout 180 python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" --tuned "$OUT/tuned_h200.json" 2>&1 \
  | tee "$OUT/cuda.log" | tail -14
