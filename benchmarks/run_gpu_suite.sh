#!/usr/bin/env bash
# Every GPU check the issues ask for, in one device call, each step time-boxed so that a slow one (fla's
# autotuning of a new kernel shape) cannot starve the others; logs go to $OUT (or ./gpu-logs).
# Usage on the GPU host, after `source .gpu/setup.sh`:  bash benchmarks/run_gpu_suite.sh [STEP ...]
# (steps: kernels gpu_tests bench_layer bench_decode; default all). Then `gpu_save_cache $OUT` (a function of
# setup.sh, not visible in this script's shell) to bring the autotune results back.
set -u
steps=${*:-kernels gpu_tests bench_layer bench_decode}
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  echo "== $name"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? ($name.log)"
  grep -E "relative errors|passed|failed|x host|faster|^NVIDIA|^layer|^GatedDeltaNet|^mom_wrap|^fla" "$out/$name.log" | cut -c1-240
}
step kernels 120 python -m pytest -q tests/test_kernels.py
step gpu_tests 300 python -m pytest -q -s -m gpu tests/
step bench_layer 200 python benchmarks/bench_layer.py --iters 20
step bench_decode 300 python benchmarks/bench_decode.py --steps 30 --profile
