#!/bin/bash
# Lead, session 13, GPU call 2 (8B shape; carries .whl .tok): issue 13's load test through the CLI,
# no profiler (call 1's miss_profile load figures were taken with torch.profiler's CUDA tracing on
# for 2.5 s of each 6 s window; every client stalled behind it: p90 5-7 s in every run).
#   serve_miss5  8 clients, 5% misses, threads and asyncio, full prefill one at a time
#   serve_hits   8 clients, every chunk stored, threads
set -u
REAL=$OUT; export OUT=/tmp/res2; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  cp -r $OUT/* $REAL/ 2>/dev/null
}
S="python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --k 16 --passages 64 --new-tokens 1 --codec int8 --batching off --device-cache 24 --full sequential"
step serve_miss5 ${M5_S:-200} $S --seconds 10 --warmup-seconds 6 --miss 0.05 --mode threads,asyncio --out $OUT/serve_miss5
step serve_hits ${H_S:-150} $S --seconds 10 --warmup-seconds 6 --miss 0 --mode threads --out $OUT/serve_hits
cat $OUT/steps.txt
for f in serve_miss5 serve_hits; do echo "== $f"; grep -E "q/s|with a miss|met misses|fused vs|graph warm" $OUT/$f.log | cut -c1-240; done
exit 0
