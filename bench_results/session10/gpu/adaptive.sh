#!/bin/bash
# GPU step of the adaptive-loading engineer (issue 16, session 10), H200, Llama-3-8B shape (random
# bf16 weights), 8K context (16 x 512 tokens), qfast 15%; no SmolLM2 GGUF needed (the tokenizer in
# .tok); nothing extra carried. <= 200 s wall (step 1 <= 150 s, step 2 <= 35 s; setup ~5-10 s):
#   1. adaptive: the plain prefill and the fallback; the front alone for k chunks; per codec (int2m
#      at 10, 25, 1 Gb/s; int8 at 10) over an EMULATED link (in-process throttle over LMDB): a
#      fresh planner after warmup() (its warm-up time, first calls and timed TTFT; at int2m 10 Gb/s
#      the process's first adaptive engine), streamed splits with the front read layer by layer
#      and, A/B, with the whole-front wait of session 9; at int2m 10 Gb/s a fresh planner without
#      warmup; then the PROJECTION table. Writes $OUT/adaptive/adaptive_h200.{json,log} and
#      adaptive_h200_projection.md after every row (a cut keeps what finished).
#   2. gputest: tests/test_gpu.py -k adaptive (the streamed CUDA path against the CPU's, a damaged
#      entry repaired; the front read layer by layer equal to the whole-front wait bit for bit;
#      after an adaptive warmup nothing recorded or run eagerly).
#   bash bench_results/session10/gpu/adaptive.sh
# CPU smoke of step 1: DEVICE=cpu bash bench_results/session10/gpu/adaptive.sh (tiny shape, no setup)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p $OUT/adaptive
: > $OUT/adaptive/steps.txt
if [ "${DEVICE:-cuda}" = cpu ]; then
  ARGS="--shape tiny --device cpu --passages 4 --splits 0,1,2 --ab 1,2 --splits8 2 --deep 1 --reps 1 --warmup 1 --fronts 1,2 --planner-calls 4 --gbits 10,1"
  PY=${PY:-.venv/bin/python}; export PYTHONPATH=.
else
  ARGS=""
  PY=python3
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh > /dev/null 2>&1 ;; esac
fi
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/adaptive/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/adaptive/steps.txt
}
step adaptive 150 $PY bench_results/session10/gpu/adaptive_h200.py --out $OUT/adaptive $ARGS
[ "${DEVICE:-cuda}" = cpu ] || step gputest 35 $PY -m pytest -x -q tests/test_gpu.py -k adaptive -p no:cacheprovider
cat $OUT/adaptive/steps.txt
grep -E "full prefill|front |warmup|first calls|timed|split" $OUT/adaptive/adaptive.log | cut -c1-300 | head -60
cat $OUT/adaptive/adaptive_h200_projection.md 2>/dev/null
[ -f $OUT/adaptive/gputest.log ] && tail -n 3 $OUT/adaptive/gputest.log
exit 0
