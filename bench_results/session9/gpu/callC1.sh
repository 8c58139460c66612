#!/bin/bash
# Lead, session 9, GPU call C1 (window 2; 8B shape; carries .whl .tok .gg1):
#   serve_hits   call A's load test again (8 clients, 16 of 64 passages, no misses, one new
#                token, device cache, graph warm-up at start-up): is the target met run to run?
#   serve_dec    the same with 16 new tokens: the fused side's answers decoded together
#                (--decode batched) against full prefill run sequentially and batched (--full both)
#   gputests     threads/asyncio and device-cache gpu tests on the final engine (queue-once misses,
#                exact_first variants landed after call A)
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
step gputests 45 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_gpu_concurrency.py \
  tests/test_gpu_devicecache.py
step adaptive 150 bash bench_results/session9/gpu/adaptive.sh
cat $OUT/steps.txt
grep -E "warm-up|q/s|fused vs" $OUT/serve_hits.log $OUT/serve_dec.log
tail -n 3 $OUT/gputests.log
tail -n 30 $OUT/adaptive.log
