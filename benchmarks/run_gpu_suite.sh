#!/usr/bin/env bash
# Every GPU check the issues ask for, in one device call, each step time-boxed so that a slow one (fla's
# autotuning of a new kernel shape) cannot starve the others. Logs and JSON rows go to $LOGS (default
# /tmp/gpu-logs) and, packed, to $OUT/gpu-logs.tar.gz (the device tool brings back at most 8 files).
# Usage on the GPU host, after `source .gpu/setup.sh`:  bash benchmarks/run_gpu_suite.sh [STEP ...]
# (steps: warm kernels gpu_tests every_host gpu_extreme check bench_layer bench_scalar_decay bench_decode syncs memory
# soak targets; default all but gpu_extreme, soak and targets, which take about 6, 7 and 2-3 minutes a host on an
# H100 and are best calls of their own; every_host takes 4-7 minutes with its cases in parallel).
# Then `gpu_save_cache $OUT` (a function of setup.sh, not visible in this script's shell) to bring the
# autotune results back.
#
# What a fresh machine costs (H100, 2026-11-26): every Triton kernel compiles again (the cache carries the
# autotune choices, not binaries): 35-45 s per benchmark process; a host never tuned before 1-4 minutes more.
# So `warm` first runs every benchmark once, all at once (compiling in parallel on the CPU cores), and the
# timed steps after it find the kernels compiled. TRITON_CACHE_AUTOTUNING=1 makes every autotuner keep its
# results on disk (fla's do already; mamba-ssm's would otherwise tune again in every process).
set -u
steps=${*:-warm kernels gpu_tests every_host check bench_layer bench_scalar_decay bench_decode syncs memory}
out=${LOGS:-/tmp/gpu-logs}
hosts=${HOSTS:-GatedDeltaNet DeltaNet GatedLinearAttention RWKV6Attention RWKV7Attention Mamba2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
want() { [[ " $steps " == *" $1 "* ]]; }
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout -s INT -k 30 "$limit" "$@" > "$out/$name.log" 2>&1  # (INT: pytest still prints its summary)
  echo "   exit $? ($name.log)"
  grep -E "relative errors|rel err|passed|failed|skipped|error|x host|faster|fail|^NVIDIA|^layer|^kernel|^mom_wrap|^fla|PASS|FAIL" \
    "$out/$name.log" \
    | cut -c1-240
}
if want warm; then
  echo "== warm (parallel)"
  for h in $hosts; do timeout 300 python benchmarks/bench_layer.py --host "$h" --iters 2 > /dev/null 2>&1 & done
  timeout 300 python benchmarks/bench_scalar_decay.py > /dev/null 2>&1 &
  wait
fi
want kernels && step kernels 180 python -m pytest -q tests/test_kernels.py tests/test_combine_kernels.py \
  tests/test_delta_step.py
# one pytest process per file: a CUDA error (an illegal memory access in fla's kernels, say) poisons the rest
# of its process, and so only its own file's results
if want gpu_tests; then
  for f in test_gpu test_gpu_generation test_training_engines test_fla_mom test_hardening test_kernels_large \
           test_recurrence test_host_linear_attention test_host_gsa; do
    step "gpu_tests_$f" 300 python -m pytest -q -s -m gpu "tests/$f.py"
  done
fi
# tests/test_every_host.py's GPU check, one process per host case, $JOBS (16) at a time: each case compiles its host's
# kernels for 100-250 s (H100, 2026-12-08, MOM_WRAP_FIRST_CONFIG=1), so one process cannot run the 19 in a call
if want every_host; then
  echo "== every_host (one process per case, ${JOBS:-16} at a time)"
  python -m pytest -q --collect-only -m gpu tests/test_every_host.py 2>/dev/null | grep '::' > "$out/every_host.ids"
  i=0
  while read -r id; do
    i=$((i + 1))
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-16}" ]; do sleep 1; done
    MOM_WRAP_FIRST_CONFIG=${MOM_WRAP_FIRST_CONFIG:-1} timeout -s INT -k 30 "${CASE_LIMIT:-400}" \
      python -m pytest -q -s -m gpu "$id" < /dev/null > "$out/every_host_$i.log" 2>&1 &
  done < "$out/every_host.ids"
  wait
  i=0
  while read -r id; do
    i=$((i + 1))
    summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$out/every_host_$i.log" | tail -1)
    echo "   ${id#*::}: ${summary:-no summary (every_host_$i.log: cut at CASE_LIMIT?)}"
  done < "$out/every_host.ids"
fi
# (the T = 65,536 extreme-routing tests take about 6 minutes, most of it the step-by-step torch reference)
want gpu_extreme && step gpu_extreme 560 python -m pytest -q -s -m gpu tests/test_gpu_extreme.py
want check && step check 400 python -m mom_wrap.check --device cuda --first-config
if want bench_layer; then
  for h in $hosts; do
    step "bench_layer_$h" 90 python benchmarks/bench_layer.py --host "$h" --iters 50 --json "$out/bench_layer_$h.json"
  done
fi
want bench_scalar_decay && step bench_scalar_decay 90 python benchmarks/bench_scalar_decay.py \
  --json "$out/bench_scalar_decay.json"
want bench_decode && step bench_decode 300 python benchmarks/bench_decode.py --steps 30 --json "$out/bench_decode.json"
want syncs && step syncs 200 python benchmarks/syncs.py
want memory && step memory 200 python benchmarks/bench_layer.py --batch 2 --seq-len 16384 --iters 20 --memory \
  --profile
want soak && step soak 560 python benchmarks/soak.py --json "$out/soak.json"
# issue 24's cases for every host of $HOSTS (each number the median of 5 interleaved repetitions), then its table
if want targets; then
  for h in $hosts; do
    for case in "8 2048" "2 16384"; do set -- $case
      step "targets_${h}_fwdbwd_$1x$2" 150 python benchmarks/bench_layer.py --host "$h" --batch $1 --seq-len $2 \
        --iters 10 --json "$out/targets_${h}_fwdbwd_$1x$2.json"
    done
    for case in "1 32768" "8 4096"; do set -- $case
      step "targets_${h}_prefill_$1x$2" 150 python benchmarks/bench_layer.py --host "$h" --batch $1 --seq-len $2 \
        --prefill --iters 10 --json "$out/targets_${h}_prefill_$1x$2.json"
    done
    step "targets_${h}_decode" 200 python benchmarks/bench_decode.py --host "$h" --batch 64 --steps 30 \
      --json "$out/targets_${h}_decode.json"
  done
  python benchmarks/targets.py "$out"/targets_*.json | tee "$out/targets.md"
fi
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu-logs.tar.gz" -C "$out" . && echo "logs: \$OUT/gpu-logs.tar.gz"
