#!/bin/bash
# GPU call of the adaptive-loading engineer (issue 16, session 9), H200, Llama-3-8B shape (random
# bf16 weights), 8K context (16 x 512 tokens), qfast 15%; no SmolLM2 GGUF needed for step 1;
# nothing extra carried. <= 150 s wall (step 1 <= 115 s, step 2 <= 30 s; setup ~5 s when not done):
#   1. adaptive: the fallback against the plain prefill, interleaved, with two pieces of the
#      fallback alone (where its last ~8 ms go); the front alone for k chunks; per codec (int2m,
#      at 10, 1 and 25 Gb/s, int8 at 10) over an EMULATED link (in-process throttle over the LMDB store): plain fetch, streamed splits (link / front / front queueing / tail, direct copies
#      from the pinned landing arena or not), a fresh planner's first calls and its timed TTFT;
#      then the PROJECTION table. Writes $OUT/adaptive/adaptive_h200.{json,log},
#      adaptive_h200_projection.md after every row (a cut keeps what finished).
#   2. gputest: tests/test_gpu.py -k adaptive (the streamed CUDA path, front on its own stream,
#      against the CPU's; a damaged entry dropped and repaired; needs the SmolLM2 tokenizer).
#   bash bench_results/session9/gpu/adaptive.sh
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
step adaptive 115 python3 bench_results/session9/gpu/adaptive_h200.py --out $OUT/adaptive
step gputest 30 python3 -m pytest -x -q tests/test_gpu.py -k adaptive -p no:cacheprovider
cat $OUT/adaptive/steps.txt
grep -E "full prefill|encode_exact|forward_dyn|stages|front |planner|plain fetch|split|\[int" $OUT/adaptive/adaptive.log | cut -c1-400 | head -80
cat $OUT/adaptive/adaptive_h200_projection.md 2>/dev/null
tail -n 3 $OUT/adaptive/gputest.log
