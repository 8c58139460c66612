#!/bin/bash
# Lead, session 10, GPU call A (8B shape; carries .whl .tok .gg1). In this order:
#   gputests    CUDA tests of what changed: concurrency (store writes no longer wait for fusions
#               holding views; zero-copy readers while the map grows), device cache, warm-up
#   serve_miss  8 clients, 16 of 64 passages, 5% misses, one token: fused (graph warm-up, device
#               cache) against full prefill; queries with and without a miss apart, miss breakdown
#   serve_dec   the same with 16 new tokens, answers decoded together, full prefill sequential
#               and batched (its best is the baseline)
#   adaptive    the adaptive engineer's bench_results/session10/gpu/adaptive.sh (<= 200 s)
set -u
REAL=$OUT; export OUT=/tmp/resA; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/callA.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step gputests 75 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_gpu_concurrency.py \
  tests/test_gpu_devicecache.py tests/test_store_hostile.py tests/test_warmup.py ${EXTRA_TESTS:-}
SERVE="python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --k 16 --codec int8 --batching off --device-cache 24 --miss 0.05"
step serve_miss 100 $SERVE --seconds 10 --warmup-seconds 3 --new-tokens 1 --full sequential --out $OUT/serve_miss
step serve_dec 125 $SERVE --seconds 8 --warmup-seconds 3 --new-tokens 16 --decode batched --full both --out $OUT/serve_dec
[ -f bench_results/session10/gpu/adaptive.sh ] && step adaptive 205 bash bench_results/session10/gpu/adaptive.sh
cat $OUT/steps.txt
tail -n 3 $OUT/gputests.log
grep -E "warm-up|q/s|with a miss|met misses|fused vs" $OUT/serve_miss.log $OUT/serve_dec.log
[ -f $OUT/adaptive/steps.txt ] && tail -n 25 $OUT/adaptive.log
