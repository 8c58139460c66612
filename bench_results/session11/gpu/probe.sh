#!/bin/bash
# GPU call of the probe engineer (issue 14 requirement 3, session 11): the selection probe's share
# of the GPU TTFT at 8K and 32K, H200, Llama-3-8B shape (random bf16 weights), SmolLM2's tokenizer
# from the carried .tok (no GGUF needed), int8 LMDB store, ratio 0.15. <= 150 s wall:
#   1. probe (<= 118 s; steps past --wall 100 s are skipped, JSON rewritten after every step):
#      bench_results/session11/gpu/probe.py: full prefill, naive, epic0 (no probe, same k), qfast,
#      qdeep, qshallow, qvalue through engine.fuse on texts, round-robin medians of 5 after 2
#      warm-up calls; then epic0/qfast/qdeep/qvalue behind an 8 GiB device cache (no load); then a
#      sink="context", exact_first=True engine with no policy given (its default: qvalue) against
#      qfast, 8K. Writes $OUT/probe/probe.{json,md,log}.
#   2. gputest (<= 25 s): tests/test_gpu.py::test_cuda_matches_cpu_path for qvalue and epic0 (fast
#      path and eager against the CPU: the new default's and the no-probe policy's CUDA paths).
#   source bench_results/session7/gpu/setup.sh; bash bench_results/session11/gpu/probe.sh
# CPU smoke (tiny shape, no setup, ~1 min): DEVICE=cpu bash bench_results/session11/gpu/probe.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p $OUT/probe
: > $OUT/probe/steps.txt
if [ "${DEVICE:-cuda}" = cpu ]; then
  ARGS="--shape tiny --device cpu --contexts 1024,2048 --reps 2 --warmup 1 --context-sink"
  PY=${PY:-.venv/bin/python}; export PYTHONPATH=. OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  ARGS="--wall ${WALL:-100} --device-cache 8 --context-sink"
  PY=python3
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh > /dev/null 2>&1 ;; esac
fi
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/probe/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/probe/steps.txt
}
step probe ${PROBE_S:-118} $PY bench_results/session11/gpu/probe.py --out $OUT/probe $ARGS
[ "${DEVICE:-cuda}" = cpu ] || step gputest 25 $PY -m pytest -x -q tests/test_gpu.py -k "matches_cpu_path and (qvalue or epic0)" -p no:cacheprovider
cat $OUT/probe/steps.txt
cat $OUT/probe/probe.md 2>/dev/null || tail -n 30 $OUT/probe/probe.log
[ -f $OUT/probe/gputest.log ] && tail -n 3 $OUT/probe/gputest.log
true
