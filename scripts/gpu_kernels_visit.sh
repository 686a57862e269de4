#!/usr/bin/env bash
# One device visit for issue 12: the GPU tests of glmc.kernels, the GEMV sweep (-> $OUT/tuned_h200.json) and the cuda
# engine's decode tok/s at ChatGLM3-6B shape (benchmarks/bench_cuda.py), as one command that writes to $OUT.
# Usage (device machine, repo root): bash scripts/gpu_kernels_visit.sh [LAYERS] [MODE: full|sweep|table|ab]
#   full: every GPU test (incl. the cuda target's, which needs onnxsim: .whl/ carried), the whole sweep with the small
#     kernels' micro-benchmarks, then bench_cuda.py at LAYERS with that table
#   sweep: the GPU tests (TESTS, a -k expression; default all but the cuda-target ones); with BEFORE=1 bench_cuda.py
#     at batch 1 on the shipped table, profiled; the mma sweep of SWEEP_PRECISIONS (default int8 int4-g128); then
#     bench_cuda.py --versus at LAYERS: those precisions' decode rows on the shipped table and on the sweep's, timed
#     in turn (BENCH_ARGS adds options) until DEADLINE (580 s)
#   kv: the KV-cache and greedy GPU tests, bench_kernels.py --kv-only, and bench_cuda.py's kv rows (fp16 and int8
#     weights, fp16 vs int8 cache at batch 16 / 8k); with AB=ab/REV also that tree's kv rows (same bench_cuda.py)
#   table: bench_cuda.py alone at LAYERS on the shipped table: every precision, kv8 rows and peers in one process
#   ab: this tree against another revision, each bench_cuda.py (fp16, int8, int4-g128, batch 1) in its own process,
#     with GLMC_PDL=1 and 0 (profiled); AB=ab/REV, made here first with
#     mkdir -p ab/REV && git archive REV glmc benchmarks | tar -x -C ab/REV   (and carried: run's carry ["ab"])
# The modes of the earlier visits (quick, words, kv8, final, mma, pdl): git show bc58ee8:scripts/gpu_kernels_visit.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LAYERS=${1:-28}
MODE=${2:-full}
OUT=${OUT:-/tmp/visit-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv;
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/visit.log"
T0=$(date +%s)
case "$MODE" in
table)
  timeout "${BENCH_TIMEOUT:-380}" python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" 2>&1 \
    | tee "$OUT/cuda.log" | tail -30 ;;
ab)
  [ -f "${AB:?AB=ab/REV}/benchmarks/bench_cuda.py" ] || { echo "no $AB/benchmarks/bench_cuda.py (usage)"; exit 2; }
  for pdl in 1 0; do
    for tree in . "$AB"; do
      name=$([ "$tree" = . ] && echo head || basename "$tree")
      echo "== $name GLMC_PDL=$pdl"
      # shellcheck disable=SC2046  # the profile only without PDL (with it a kernel's time includes its wait)
      GLMC_PDL=$pdl timeout 100 python3 "$tree/benchmarks/bench_cuda.py" --out "$OUT/$name-pdl$pdl" \
        --layers "$LAYERS" --precisions fp16 int8 int4-g128 --batches 1 --kv8 --peers \
        $([ $pdl = 0 ] && echo --profile 8) 2>&1 | grep "batch\|  " | grep -v warn
    done
  done ;;
kv)
  timeout 150 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py -rs \
    -k "attention or int8_cache or greedy" 2>&1 | tee "$OUT/tests.log" | grep -v PASSED | tail -12
  timeout 120 python3 benchmarks/bench_kernels.py --out "$OUT" --kv-only 2>&1 | tee "$OUT/kernels.log" | grep "^|"
  for tree in . ${AB:-}; do
    name=$([ "$tree" = . ] && echo head || basename "$tree")
    echo "== $name kv rows"
    (cd "$tree" && PYTHONPATH=$PWD timeout 200 python3 "$OLDPWD/benchmarks/bench_cuda.py" --out "$OUT/$name" \
      --layers "$LAYERS" --precisions --kv8 fp16 int8 --peers 2>&1 | grep "@\|rror")
  done ;;
sweep)
  timeout 130 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py -rs -k "${TESTS:-not cuda_target}" \
    2>&1 | tee "$OUT/tests.log" | grep -v PASSED | tail -25
  if [ -n "$BEFORE" ]; then  # the shipped table first, batch 1, profiled: what the sweep is compared with
    timeout 150 python3 benchmarks/bench_cuda.py --out "$OUT/before" --layers "$LAYERS" \
      --precisions fp16 int8 int4-g128 --batches 1 --kv8 --peers --profile 30 2>&1 | tee "$OUT/before.log" | grep -v "^|" | tail -110
  fi
  # shellcheck disable=SC2086  # SWEEP_PRECISIONS: word-split list
  timeout "${SWEEP_TIMEOUT:-150}" python3 benchmarks/bench_kernels.py --out "$OUT" --mma --no-small \
    --precisions ${SWEEP_PRECISIONS:-int8 int4-g128} 2>&1 | tee "$OUT/kernels.log" | grep -v "^{\|^  \|WRONG\|skip" \
    | tail -30
  grep -c WRONG "$OUT/kernels.log"; grep -m3 "WRONG\|skip" "$OUT/kernels.log"
  LEFT=$(( ${DEADLINE:-580} - ($(date +%s) - T0) ))
  echo "bench_cuda: $LEFT s left"
  # shellcheck disable=SC2086  # SWEEP_PRECISIONS, BENCH_ARGS (extra bench_cuda.py options): word-split lists
  timeout "$LEFT" python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" --versus "$OUT/tuned_h200.json" \
    --precisions ${SWEEP_PRECISIONS:-int8 int4-g128} --kv8 --peers ${BENCH_ARGS:-} 2>&1 | tee "$OUT/cuda.log" \
    | grep -v "^|" | tail -120
  grep "^|" "$OUT/cuda.log" ;;
full)
  timeout 150 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_kernels.py -k "not cuda_target" -rs 2>&1 \
    | tee "$OUT/tests.log" | grep -v PASSED | tail -20
  timeout 80 python3 -m pytest -v -p no:cacheprovider tests/test_kernels.py -k cuda_target -rs 2>&1 \
    | tee -a "$OUT/tests.log" | tail -8
  timeout 200 python3 benchmarks/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log" \
    | grep -v "^{\|^  " | tail -45
  timeout 200 python3 benchmarks/bench_cuda.py --out "$OUT" --layers "$LAYERS" --tuned "$OUT/tuned_h200.json" 2>&1 \
    | tee "$OUT/cuda.log" | tail -14 ;;
*)
  echo "unknown mode '$MODE' (full, sweep, table, ab)"; exit 2 ;;
esac
