#!/bin/bash
# Lead, session 13, GPU call 4 (8B shape; carries .whl .tok):
#   ab_priority  issue 13: 5% misses, the miss stream at default and at high CUDA priority
#   ttft         issue 13 req. 5: one request through engine.fuse on texts at 8K/16K/32K, store and
#                device cache (session 7's command)
set -u
REAL=$OUT; export OUT=/tmp/res4; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  cp -r $OUT/* $REAL/ 2>/dev/null
}
step ab_priority ${AB_S:-170} python3 bench_results/session13/gpu/ab_priority.py $OUT
step ttft ${TTFT_S:-200} python3 -m chunkcache.cli bench ttft --model llama3-8b --contexts 8192,16384,32768 --codecs int8 \
  --policies qfast --reps 3 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/ttft
cat $OUT/steps.txt
grep -E "^== |q/s|with a miss|met misses|fused vs" $OUT/ab_priority.log | cut -c1-240
cat $OUT/ttft.md 2>/dev/null || tail -n 30 $OUT/ttft.log
exit 0
