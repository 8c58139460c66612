#!/bin/bash
# Lead, session 8, GPU call 2 (8B shape; carries .whl .tok): after probe-row buckets, zero-copy
# DynamicCache and the load test's warm-up: GPU tests, the load test through `chunkcache bench
# serve`, TTFT at 8K/16K/32K.
set -u
REAL=$OUT; export OUT=/tmp/res; rm -rf $OUT; mkdir -p $OUT
source bench_results/session7/gpu/setup.sh > $OUT/setup.log 2>&1
step() {
  local name=$1 budget=$2; shift 2; local t=$SECONDS
  timeout $budget "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? ${budget}s budget, took $((SECONDS-t))s" | tee -a $OUT/steps.txt
  tar czf $REAL/call2.tgz -C $OUT . ; cp $OUT/steps.txt $REAL/
}
step gputests 100 python3 -m pytest -q -x -m gpu tests/test_gpu.py tests/test_gpu_concurrency.py -p no:cacheprovider
step serve_hits 200 python3 -m chunkcache.cli bench serve --model llama3-8b --clients 8 --seconds 10 \
  --warmup-seconds 5 --k 16 --miss 0 --new-tokens 1 --codec int8 --batching off,each --device-cache 24 \
  --full both --out $OUT/serve_hits
step ttft 120 python3 -m chunkcache.bench.ttft --model llama3-8b --contexts 8192,16384,32768 --codecs int8 \
  --policies qfast --reps 5 --warmup 2 --no-cold --batch 0 --device-cache 24 --out $OUT/ttft
cat $OUT/steps.txt
tail -n 3 $OUT/gputests.log
grep -E "q/s|fused vs" $OUT/serve_hits.log
grep -E "engine.fuse|full prefill" $OUT/ttft.log | grep -v naive
