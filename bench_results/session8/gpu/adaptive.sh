#!/bin/bash
# GPU call of the adaptive-loading engineer (issue 16, session 8), H200, Llama-3-8B shape (random
# bf16 weights), 8K context (16 x 512 tokens), qfast 15%; no SmolLM2 needed for step 1; nothing
# extra carried. About 100-130 s (2 warm-up calls per configuration, 3 timed):
#   1. adaptive (<= 165 s): full prefill against the full-prefill fallback, interleaved (its
#      overhead); front recompute of k chunks; per codec (int2m, int8): local fused TTFT, then over
#      an EMULATED link (in-process throttle over the LMDB store) at 10 and 25 Gb/s: plain fetch,
#      streamed splits k = 0, 4..8, 10, 12 (qshallow 4..7 for int2m) (front recomputed while the back streams in layer by layer; link,
#      front and tail stages), the planner's own pick; then the PROJECTION table for 1/10/25 Gb/s.
#      Writes $OUT/adaptive/adaptive_h200.{json,log}, adaptive_h200_projection.md.
#   2. gputest (<= 30 s): tests/test_gpu.py -k adaptive (the streamed CUDA path against the CPU's,
#      a damaged entry dropped and repaired; needs the SmolLM2 tokenizer, skips without it).
#   bash bench_results/session8/gpu/adaptive.sh
set -u
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source bench_results/session7/gpu/setup.sh > /dev/null 2>&1 ;; esac
OUT=${OUT:-/tmp/out}
mkdir -p $OUT/adaptive
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/adaptive/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/adaptive/steps.txt
}
step adaptive 165 python3 bench_results/session8/gpu/adaptive_h200.py --out $OUT/adaptive
step gputest 30 python3 -m pytest -x -q tests/test_gpu.py -k adaptive -p no:cacheprovider
cat $OUT/adaptive/steps.txt
grep -E "full prefill|planner|plain fetch|split" $OUT/adaptive/adaptive.log | head -60
cat $OUT/adaptive/adaptive_h200_projection.md 2>/dev/null
tail -n 3 $OUT/adaptive/gputest.log
