#!/bin/bash
# Lead, session 9, GPU call C1 (window 2; 8B shape; carries .whl .tok .gg1):
#   serve_hits   call A's load test again (8 clients, 16 of 64 passages, no misses, one new
#                token, device cache, graph warm-up at start-up): is the target met run to run?
#   serve_dec    the same with 16 new tokens: the fused side's answers decoded together
#                (--decode batched) against full prefill run sequentially and batched (--full both)
#   ttft16       one request through engine.fuse at 16K (not rerun in call A), store and device cache
#   adaptive     the adaptive engineer's adaptive.sh (<= 150 s)
set -u
REAL=$OUT; export OUT=/tmp/resC1; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/callC1.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
SERVE="python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --k 16 --codec int8 --batching off --device-cache 24"
step serve_hits 65 $SERVE --seconds 8 --warmup-seconds 3 --miss 0 --new-tokens 1 --full sequential --out $OUT/serve_hits
step serve_dec 80 $SERVE --seconds 6 --warmup-seconds 3 --miss 0.05 --new-tokens 16 --decode batched --full both --out $OUT/serve_dec
step ttft16 45 python3 -m chunkcache.cli bench ttft --model llama3-8b --contexts 16384 --codecs int8 \
  --policies qfast --reps 5 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/ttft16
step adaptive 150 bash bench_results/session9/gpu/adaptive.sh
cat $OUT/steps.txt
grep -E "warm-up|q/s|fused vs" $OUT/serve_hits.log $OUT/serve_dec.log
grep -E "engine.fuse" $OUT/ttft16.log
tail -n 30 $OUT/adaptive.log
