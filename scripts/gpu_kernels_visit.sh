#!/usr/bin/env bash
# One device visit for issue 12: GPU tests of glmc.kernels + the cuda backend + the cuda build target, the kernel
# micro-benchmarks and GEMV sweep (-> $OUT/tuned_h200.json), then the cuda backend's decode tok/s at ChatGLM3-6B
# shape with the tuned table.
# Usage (device machine, repo root): bash scripts/gpu_kernels_visit.sh [LAYERS] [MODE: full|quick|words|kv8|table|final|mma|pdl|sweep]
#   words: sweep only int8/int4's word-variant GEMVs beside the shipped table's winners (no small kernels), and run
#     only the GPU tests of what changed since the last visit (GEMV kernels, greedy vs torch)
#   kv8: the int8 KV cache's GPU tests (kernels vs reference, greedy vs torch, the cuda target built and verified
#     with kv8), the KV-cache kernels fp16 vs int8 (bench_kernels.py --kv-only), then bench_cuda.py (the shipped
#     GEMV table, kv8 rows, torch.compile peers) at LAYERS
#   table: bench_cuda.py alone at LAYERS (the shipped GEMV table): precisions, kv8 rows and peers in one process
#   final: the GPU tests of what changed after the kv8 visit (attention kernels, fp8 GEMV, greedy vs torch for every
#     precision, the fp8 cuda target), the KV-cache kernels, then bench_cuda.py at LAYERS until DEADLINE seconds
#     after the start (default 405)
#   mma: the tensor-core GEMV's GPU tests, the mma configs swept beside the shipped table's winners (fp16, int8,
#     int4-g128; -> $OUT/tuned_h200.json), then bench_cuda.py at LAYERS with that table (no kv8 rows, no peers)
#   pdl: every GPU kernel test (PDL on), the mma configs of int8/int4 swept (from BASE_TUNED), then bench_cuda.py at
#     LAYERS with that table twice: GLMC_PDL=1 and GLMC_PDL=0
#   sweep: the GPU tests (TESTS, a -k expression; default all but the cuda-target ones); with BEFORE=1 bench_cuda.py
#     at batch 1 on the shipped table, profiled; the mma sweep of SWEEP_PRECISIONS (default int8 int4-g128); then bench_cuda.py at LAYERS with that table
#     (every precision, kv8 rows, peers; BENCH_ARGS adds options) until DEADLINE (580 s)
# Wheels the machine lacks (onnxsim, for the cuda-target test's compile) travel in .whl/ (carry it).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LAYERS=${1:-28}
SWEEP=${2:-full}
OUT=${OUT:-/tmp/visit-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv;
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/visit.log"
T0=$(date +%s)
if [ "$SWEEP" = mma ]; then
  timeout 120 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py -rs -k "mma_kernel" 2>&1 \
    | tee "$OUT/tests.log" | grep -v PASSED | tail -25
  timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/bench_kernels.py --out "$OUT" --mma --no-small 2>&1 \
    | tee "$OUT/kernels.log" | grep -v "^{\|^  \|WRONG\|skip" | tail -30
  grep -c WRONG "$OUT/kernels.log"; grep -m3 "WRONG\|skip" "$OUT/kernels.log"
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" \
    --tuned "$OUT/tuned_h200.json" --precisions fp16 int8 int4-g128 --kv8 --peers 2>&1 | tee "$OUT/cuda.log" | tail -12
  exit
fi
if [ "$SWEEP" = pdl ]; then
  timeout 170 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py -rs -k "not cuda_target" 2>&1 \
    | tee "$OUT/tests.log" | grep -v PASSED | tail -25
  timeout "${SWEEP_TIMEOUT:-150}" python3 benchmarks/bench_kernels.py --out "$OUT" --mma --no-small \
    --precisions int8 int4-g128 --base-tuned "${BASE_TUNED:-glmc/kernels/tuned_h200.json}" 2>&1 \
    | tee "$OUT/kernels.log" | grep -v "^{\|^  \|WRONG\|skip" | tail -20
  grep -c WRONG "$OUT/kernels.log"; grep -m3 "WRONG\|skip" "$OUT/kernels.log"
  for P in 1 0; do
    GLMC_PDL=$P timeout "${BENCH_TIMEOUT:-100}" python3 benchmarks/bench_cuda.py --out "$OUT/pdl$P" --layers "$LAYERS" \
      --tuned "$OUT/tuned_h200.json" --precisions fp16 int8 int4-g128 --kv8 --peers 2>&1 | tee "$OUT/cuda_pdl$P.log" \
      | tail -6
  done
  exit
fi
if [ "$SWEEP" = sweep ]; then
  timeout 130 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py -rs -k "${TESTS:-not cuda_target}" \
    2>&1 | tee "$OUT/tests.log" | grep -v PASSED | tail -25
  if [ -n "$BEFORE" ]; then  # the shipped table first, batch 1, profiled: what the sweep is compared with
    timeout 150 python3 benchmarks/bench_cuda.py --out "$OUT/before" --layers "$LAYERS" --precisions fp16 int8 int4-g128 \
      --batches 1 --kv8 --peers --profile 30 2>&1 | tee "$OUT/before.log" | grep -v "^|" | tail -110
  fi
  # shellcheck disable=SC2086  # SWEEP_PRECISIONS: word-split list
  timeout "${SWEEP_TIMEOUT:-150}" python3 benchmarks/bench_kernels.py --out "$OUT" --mma --no-small \
    --precisions ${SWEEP_PRECISIONS:-int8 int4-g128} 2>&1 | tee "$OUT/kernels.log" | grep -v "^{\|^  \|WRONG\|skip" \
    | tail -30
  grep -c WRONG "$OUT/kernels.log"; grep -m3 "WRONG\|skip" "$OUT/kernels.log"
  LEFT=$(( ${DEADLINE:-580} - ($(date +%s) - T0) ))
  echo "bench_cuda: $LEFT s left"
  # shellcheck disable=SC2086  # BENCH_ARGS: extra bench_cuda.py options, word-split (e.g. "--peers --profile 30")
  timeout "$LEFT" python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" --tuned "$OUT/tuned_h200.json" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/cuda.log" | grep -v "^|" | tail -120
  grep "^|" "$OUT/cuda.log"
  exit
fi
if [ "$SWEEP" = final ]; then
  timeout 115 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py -rs -k "int8_cache or \
rotary_append_and or fp8_linear_kernel or cuda_backend_greedy or (cuda_target_runs and fp8)" 2>&1 \
    | tee "$OUT/tests.log" | grep -v PASSED | tail -25
  timeout 30 python3 benchmarks/bench_kernels.py --out "$OUT" --kv-only 2>&1 | tee "$OUT/kernels.log" \
    | grep -v "^{\|^  " | tail -20
  LEFT=$(( ${DEADLINE:-405} - ($(date +%s) - T0) ))
  echo "bench_cuda: $LEFT s left"
  timeout "$LEFT" python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" 2>&1 | tee "$OUT/cuda.log" \
    | grep -v "^|" | tail -16
  grep "^|" "$OUT/cuda.log"
  exit
fi
if [ "$SWEEP" = kv8 ] || [ "$SWEEP" = table ]; then
  if [ "$SWEEP" = kv8 ]; then
    timeout 170 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py -rs \
      -k "int8_cache or cuda_backend_greedy or cuda_target_runs" 2>&1 | tee "$OUT/tests.log" | grep -v PASSED | tail -25
    timeout 45 python3 benchmarks/bench_kernels.py --out "$OUT" --kv-only 2>&1 | tee "$OUT/kernels.log" \
      | grep -v "^{\|^  " | tail -22
  fi
  timeout "${BENCH_TIMEOUT:-380}" python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" 2>&1 \
    | tee "$OUT/cuda.log" | tail -30
  exit
fi
if [ "$SWEEP" = words ]; then
  TESTS=(-k "quantized_linear_kernel or cuda_backend_greedy")
  KARGS=(--precisions int8 int4-g128 --words-only --no-small)
else
  TESTS=(-k "not cuda_target")
  KARGS=($([ "$SWEEP" = quick ] && echo --quick))
fi
timeout 150 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py "${TESTS[@]}" -rs 2>&1 \
  | tee "$OUT/tests.log" | grep -v PASSED | tail -20
[ "$SWEEP" = words ] || timeout 80 python3 -m pytest -v -p no:cacheprovider tests/test_kernels.py -k cuda_target \
  -rs 2>&1 | tee -a "$OUT/tests.log" | tail -8
timeout 160 python3 benchmarks/bench_kernels.py --out "$OUT" "${KARGS[@]}" 2>&1 \
  | tee "$OUT/kernels.log" | grep -v "^{\|^  " | tail -45
timeout 130 python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" --tuned "$OUT/tuned_h200.json" 2>&1 \
  | tee "$OUT/cuda.log" | tail -14
