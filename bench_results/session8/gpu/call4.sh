#!/bin/bash
# Lead, session 8, GPU call 4 (8B shape; carries .whl .tok .gg1): the final window's first call.
#   gpu tests of what changed (probe buckets, one-launch assembly, series bounds, FIFO pool,
#   per-thread warm-up, adaptive streaming), the load test after 8 s of steady-state warm-up,
#   then the adaptive engineer's H200 measurement (emulated links + projection).
set -u
REAL=$OUT; export OUT=/tmp/res; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/call4.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step gputests 75 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_devicecache.py \
  tests/test_gpu_concurrency.py -p no:cacheprovider
step serve_hits 85 python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --seconds 8 \
  --warmup-seconds 8 --k 16 --miss 0 --new-tokens 1 --codec int8 --batching off --device-cache 24 \
  --full sequential --out $OUT/serve_hits
mkdir -p $OUT/adaptive
step adaptive 120 python3 bench_results/session8/gpu/adaptive_h200.py --out $OUT/adaptive
cat $OUT/steps.txt
tail -n 2 $OUT/gputests.log
grep -E "q/s|fused vs" $OUT/serve_hits.log
cat $OUT/adaptive/adaptive_h200_projection.md 2>/dev/null | head -40
